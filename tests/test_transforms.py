"""Transforms: TTE crop geometry on images whose pixels encode their coordinates, collate, view averaging."""
import pickle

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image as ImageFeature
from PIL import Image
from torch.utils.data import DataLoader
from transformers import ViTConfig, ViTForImageClassification

from lt_utils.errors import UserError
from lt_utils.engine import forward_views
from lt_utils import data_loaders as T
from lt_utils.data import images as data_images
from lt_utils.data.images import ImageSplit
from lt_utils.transforms import (
    SeededAugment,
    build_eval_transform,
    build_train_transform,
    build_tte_transform,
    collate,
    sample_seed,
    tte_expand,
)

IDENTITY = dict(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])  # keeps pixel values readable: value / 255
SIZE, PATCH = 32, 4  # expand = 6, so five-crop works on a 38 x 38 image
STEP = 6  # coordinate encoding: R = 6 * x, G = 6 * y (fits in uint8 up to 42 pixels)


def coordinate_image(height, width, step=STEP):
    """RGB image with R = step * x, G = step * y, B = 0."""
    assert step * (max(height, width) - 1) <= 255
    ys, xs = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([step * xs, step * ys, np.zeros_like(xs)], axis=-1).astype(np.uint8))


def origin(view, step=STEP):
    """(x, y) of a view's top-left pixel, decoded from the coordinate encoding."""
    r, g = (view[:2, 0, 0] * 255 / step).round().long().tolist()
    return r, g


def as_tensor(image):
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def test_tte_expand_is_one_and_a_half_patches_rounded_half_up():
    assert tte_expand(224, 16) == 24
    assert tte_expand(336, 14) == 21
    assert tte_expand(224, 32) == 48
    assert tte_expand(224, 7) == 11  # 10.5 rounds up, not to even


def test_fivecrop_takes_the_four_corners_and_centre():
    side = SIZE + tte_expand(SIZE, PATCH)
    image = coordinate_image(side, side)  # already at the TTE size, so the resize is the identity
    views = build_tte_transform("fivecrop", SIZE, PATCH, **IDENTITY)(image)
    assert views.shape == (5, 3, SIZE, SIZE) and views.dtype == torch.float32
    assert [origin(v) for v in views] == [(0, 0), (6, 0), (0, 6), (6, 6), (3, 3)]
    full = as_tensor(image)
    for view, (x, y) in zip(views, [(0, 0), (6, 0), (0, 6), (6, 6), (3, 3)]):
        assert torch.allclose(view, full[:, y : y + SIZE, x : x + SIZE], atol=1e-6)


def test_fivecrop_resizes_the_shorter_side_to_size_plus_expand():
    # 42 x 84 (H x W) -> 38 x 76: corners are those of the aspect-preserving resize.
    image = coordinate_image(42, 84, step=3)
    views = build_tte_transform("fivecrop", SIZE, PATCH, **IDENTITY, interpolation="bilinear")(image)
    assert views.shape == (5, 3, SIZE, SIZE)
    scale = 84 / 76  # original pixels per resized pixel
    # Top-right crop starts at resized column 76 - 32 = 44; bottom crops at row 38 - 32 = 6.
    expected = {1: (44, 0), 2: (0, 6), 3: (44, 6), 4: (22, 3)}
    for index, (col, row) in expected.items():
        x, y = (views[index][:2, 0, 0] * 255 / 3).tolist()
        assert x == pytest.approx((col + 0.5) * scale - 0.5, abs=0.7)
        assert y == pytest.approx((row + 0.5) * scale - 0.5, abs=0.7)


@pytest.mark.parametrize("width", [SIZE + tte_expand(SIZE, PATCH), SIZE + tte_expand(SIZE, PATCH) + 1])
def test_tencrop_appends_the_five_crops_of_the_mirrored_image(width):
    """As torchvision's TenCrop: with an odd margin the mirrored centre crop is not the mirror of the centre crop."""
    from torchvision.transforms import TenCrop

    side = SIZE + tte_expand(SIZE, PATCH)
    image = coordinate_image(side, width)  # already at the TTE size (shorter side), so the resize is the identity
    five = build_tte_transform("fivecrop", SIZE, PATCH, **IDENTITY)(image)
    ten = build_tte_transform("tencrop", SIZE, PATCH, **IDENTITY)(image)
    assert ten.shape == (10, 3, SIZE, SIZE)
    assert torch.equal(ten[:5], five)
    assert torch.equal(ten, torch.stack([as_tensor(view) for view in TenCrop(SIZE)(image)]))
    assert origin(ten[5]) == (width - 1, 0)  # the mirrored image's top-left crop starts at the right edge
    assert torch.equal(ten[9], five[4].flip(-1)) == (width == side)


def test_flip_mode_is_the_eval_view_and_its_mirror():
    image = coordinate_image(40, 40)
    views = build_tte_transform("flip", SIZE, PATCH, **IDENTITY)(image)
    eval_view = build_eval_transform(SIZE, **IDENTITY)(image)
    assert views.shape == (2, 3, SIZE, SIZE)
    assert torch.equal(views[0], eval_view)
    assert torch.equal(views[1], eval_view.flip(-1))


def test_tte_expand_flag_sets_the_five_crop_margin():
    image = coordinate_image(SIZE + 10, SIZE + 10)  # expand 10: the resize is the identity, corners 10 px apart
    views = build_tte_transform("fivecrop", SIZE, PATCH, **IDENTITY, expand=10)(image)
    assert [origin(v) for v in views] == [(0, 0), (10, 0), (0, 10), (10, 10), (5, 5)]
    ten = build_tte_transform("tencrop", SIZE, PATCH, **IDENTITY, expand=10)(image)
    assert torch.equal(ten[:5], views)
    with pytest.raises(UserError, match="--tte_expand must be >= 0"):
        build_tte_transform("fivecrop", SIZE, PATCH, **IDENTITY, expand=-1)


def test_randaug_views_are_seeded_random_resized_crops_and_flips():
    image = coordinate_image(40, 40)
    tte = build_tte_transform("randaug", SIZE, PATCH, **IDENTITY, views=6)
    views = tte(image)
    assert views.shape == (6, 3, SIZE, SIZE)
    assert len({tuple(v.flatten()[:64].tolist()) for v in views}) == 6  # six different draws
    torch.manual_seed(123)  # the global RNG plays no part, and is left as it was
    state = torch.get_rng_state()
    again = pickle.loads(pickle.dumps(tte))(image)  # a worker's copy, later, elsewhere
    assert torch.equal(again, views) and torch.equal(torch.get_rng_state(), state)
    other = tte(coordinate_image(40, 40, step=5))
    assert not torch.equal(other, views)  # another image, other crops
    # each view is a crop of the image (scaled) or its mirror: pixel x coordinates move monotonically along a row
    xs = views[:, 0, SIZE // 2] * 255 / STEP
    steps = xs[:, 1:] - xs[:, :-1]
    assert all((row >= -1e-3).all() or (row <= 1e-3).all() for row in steps)
    assert any((row < -1e-3).any() for row in steps) and any((row > 1e-3).any() for row in steps)  # both orientations
    assert build_tte_transform("randaug", SIZE, PATCH, **IDENTITY)(image).shape == (1, 3, SIZE, SIZE)  # LIFT's 1
    with pytest.raises(UserError, match="--tte_views must be >= 1"):
        build_tte_transform("randaug", SIZE, PATCH, **IDENTITY, views=0)


def test_eval_transform_resizes_to_8_7_and_centre_crops():
    image = coordinate_image(SIZE * 8 // 7, SIZE * 8 // 7)  # 36 x 36: resize is the identity
    view = build_eval_transform(SIZE, **IDENTITY)(image)
    assert view.shape == (3, SIZE, SIZE)
    assert origin(view) == (2, 2)
    assert torch.allclose(view, as_tensor(image)[:, 2:34, 2:34], atol=1e-6)
    # Normalisation is applied: mean 0.5 / std 0.5 maps [0, 1] onto [-1, 1].
    normalized = build_eval_transform(SIZE, mean=[0.5] * 3, std=[0.5] * 3)(image)
    assert torch.allclose(normalized, view * 2 - 1)


def test_train_transform_outputs_rgb_crops_from_any_mode():
    train = build_train_transform(SIZE, **IDENTITY)
    g = torch.Generator().manual_seed(0)
    gray = Image.fromarray(np.arange(64 * 48, dtype=np.uint32).reshape(48, 64).astype(np.uint8), mode="L")
    out = train(gray, g)
    assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])  # L -> RGB repeats the channel
    rgba = Image.new("RGBA", (50, 50), (10, 20, 30, 0))
    assert torch.allclose(train(rgba, g)[:, 0, 0], torch.tensor([10, 20, 30]) / 255)
    assert type(train(rgba, g)) is torch.Tensor  # plain tensor, not a tv_tensors subclass


def test_train_crop_follows_torchvision_random_resized_crop_rule():
    crop = build_train_transform(SIZE, **IDENTITY)
    g = torch.Generator().manual_seed(0)
    boxes = [crop.crop_box(30, 40, g) for _ in range(2000)]
    areas = np.array([h * w / 1200 for _, _, h, w in boxes])
    ratios = np.array([w / h for _, _, h, w in boxes])
    assert all(0 <= t and 0 <= l and t + h <= 30 and l + w <= 40 for t, l, h, w in boxes)
    assert areas.min() >= 0.07 and areas.max() <= 1.0 and 0.3 < np.median(areas) < 0.6  # uniform in [0.08, 1], clipped
    assert ratios.min() >= 0.7 and ratios.max() <= 1.4  # log-uniform in [3/4, 4/3], up to rounding
    tops = {t for t, _, _, _ in boxes}
    assert len(tops) > 10  # positions vary
    # a strip too wide for any box: torchvision's fallback, the centre crop at the clamped ratio
    from torchvision.transforms import RandomResizedCrop

    expected = RandomResizedCrop.get_params(torch.zeros(3, 2, 100), [0.08, 1.0], [3 / 4, 4 / 3])
    assert crop.crop_box(2, 100, torch.Generator().manual_seed(0)) == tuple(expected) == (0, 48, 2, 3)


def test_seeded_augment_is_a_function_of_seed_epoch_and_sample():
    augment = SeededAugment(build_train_transform(SIZE, **IDENTITY), seed=3)
    image = coordinate_image(40, 40)
    first = augment(image, 7)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(augment(image, 7), first)
    assert not torch.equal(augment(image, 8), first)
    augment.epoch = 1
    assert not torch.equal(augment(image, 7), first)
    assert sample_seed(3, 1, 7) != sample_seed(3, 0, 7)
    assert pickle.loads(pickle.dumps(augment)).epoch == 1


def image_dataset(images, labels):
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["a", "b", "c"])})
    return Dataset.from_dict({"image": images, "label": labels}, features=features)


def test_image_split_with_datasets_and_collate():
    images = [coordinate_image(38, 38), Image.new("L", (60, 45), 128), Image.new("RGBA", (40, 40))]
    split = ImageSplit(image_dataset(images, [2, 0, 1]), build_tte_transform("fivecrop", SIZE, PATCH, **IDENTITY))
    assert split.array is None  # mixed sizes and modes: decoded when read
    batch = next(iter(DataLoader(pickle.loads(pickle.dumps(split)), batch_size=3, collate_fn=collate)))
    assert batch["pixel_values"].shape == (3, 5, 3, SIZE, SIZE)
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [2, 0, 1]
    assert [origin(v) for v in batch["pixel_values"][0]] == [(0, 0), (6, 0), (0, 6), (6, 6), (3, 3)]


def test_small_images_are_decoded_once_and_read_the_same(monkeypatch):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L") for _ in range(5)]
    ds = image_dataset(images, [0, 1, 2, 0, 1])
    eval_tf = build_eval_transform(SIZE, **IDENTITY)
    split = ImageSplit(ds, eval_tf)
    assert split.array.shape == (5, 28, 28, 1) and split.array.dtype == np.uint8
    assert split.dataset is None  # nothing left to decode per epoch
    assert data_images.decoded_array(ds) is split.array  # cached: the train split is decoded once per process
    monkeypatch.setattr(data_images, "SMALL_IMAGE_PIXELS", 0)
    monkeypatch.setattr(data_images, "_DECODED", {})
    lazy = ImageSplit(ds, eval_tf)
    assert lazy.array is None
    for i in range(5):
        assert torch.equal(split[i]["pixel_values"], lazy[i]["pixel_values"])
        assert torch.equal(split[i]["pixel_values"], eval_tf(images[i]))


def test_persistent_workers_see_each_epoch_and_match_the_main_process():
    images = [coordinate_image(40, 40) for _ in range(6)]
    ds = image_dataset(images, [0, 1, 2, 0, 1, 2])
    spec = type("Spec", (), dict(image_size=SIZE, image_mean=[0.0] * 3, image_std=[1.0] * 3, interpolation="bicubic"))
    train_tf, _ = T.image_transforms(spec, "rrc_flip")

    def epochs(num_workers):
        augment = SeededAugment(train_tf, seed=0)
        loader = T.image_loader(ds, augment, 3, num_workers)
        assert loader.persistent_workers == (num_workers > 0)
        out = []
        for epoch in range(3):
            augment.epoch = epoch
            out.append(torch.cat([b["pixel_values"] for b in loader]))
        return out

    in_process, workers = epochs(0), epochs(2)
    for a, b in zip(in_process, workers):
        assert torch.equal(a, b)
    assert not torch.equal(in_process[0], in_process[1]) and not torch.equal(in_process[1], in_process[2])


def test_image_split_names_missing_column():
    with pytest.raises(UserError, match="'img' not in the dataset"):
        ImageSplit(image_dataset([Image.new("RGB", (8, 8))], [0]), build_eval_transform(SIZE, **IDENTITY),
                   image_column="img")


def tiny_vit(tmp_path):
    config = ViTConfig(
        image_size=SIZE, patch_size=PATCH, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=7,
    )
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    return ViTForImageClassification.from_pretrained(tmp_path / "vit").eval()


def test_forward_views_runs_view_by_view_and_averages_logits(tmp_path):
    model = tiny_vit(tmp_path)
    calls = []

    def model_fn(pixel_values):
        calls.append(tuple(pixel_values.shape))
        return model(pixel_values=pixel_values).logits

    pixel_values = torch.randn(3, 5, 3, SIZE, SIZE)
    with torch.no_grad():
        averaged = forward_views(model_fn, pixel_values)
        one_by_one = torch.stack(
            [torch.stack([model(pixel_values=v[None]).logits[0] for v in views]).mean(0) for views in pixel_values]
        )
    assert calls == [(3, 3, SIZE, SIZE)] * 5  # one view at a time: a one-view batch's memory
    assert averaged.shape == (3, 7)
    assert torch.allclose(averaged, one_by_one, atol=1e-5)


def test_forward_views_passes_single_view_through(tmp_path):
    model = tiny_vit(tmp_path)
    logits_of = lambda x: model(pixel_values=x).logits
    pixel_values = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(forward_views(logits_of, pixel_values), logits_of(pixel_values))


def test_bad_mode_and_interpolation_are_user_errors():
    with pytest.raises(UserError, match="unknown --tte 'sixcrop'"):
        build_tte_transform("sixcrop", SIZE, PATCH, **IDENTITY)
    with pytest.raises(UserError, match="unknown interpolation 'lanczos'"):
        build_eval_transform(SIZE, **IDENTITY, interpolation="lanczos")


class _Spec:  # the preprocessing fields image_transforms reads (CLIP's mean and std: not an identity normalisation)
    image_size, interpolation = SIZE, "bicubic"
    image_mean, image_std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@pytest.mark.parametrize("mode, size", [("L", 28), ("RGB", 24)])
def test_augment_on_device_gives_the_loader_pixels_bit_for_bit(mode, size):
    """--augment_on_device: the loader yields uint8 images at their own size and the drawn boxes; the batch transform
    gives the pixels of the loader-side RandomResizedCropFlip exactly (CPU), every epoch, with or without workers."""
    rng = np.random.default_rng(1)
    shape = (size, size) if mode == "L" else (size, size, 3)
    images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode) for _ in range(12)]
    ds = image_dataset(images, [i % 3 for i in range(12)])
    train_tf, _ = T.image_transforms(_Spec, "rrc_flip")
    boxes_tf, on_device = T.on_device_augment(True, train_tf)

    def epochs(transform, num_workers, finish=None):
        augment = SeededAugment(transform, seed=5)
        loader = T.check_on_device_augment(T.image_loader(ds, augment, 5, num_workers)) if finish else \
            T.image_loader(ds, augment, 5, num_workers)
        out = []
        for epoch in range(2):
            augment.epoch = epoch
            for batch in loader:
                if finish:
                    assert batch["pixel_values"].dtype == torch.uint8
                    assert batch["pixel_values"].shape[1:] == (3, size, size)
                    assert batch["crop_boxes"].shape == (len(batch["labels"]), 5)
                out.append(finish(batch) if finish else batch["pixel_values"])
        return torch.cat(out)

    expected = epochs(train_tf, 0)
    assert expected.shape == (24, 3, SIZE, SIZE) and expected.dtype == torch.float32
    for num_workers in (0, 2):
        assert torch.equal(epochs(boxes_tf, num_workers, on_device), expected)
    boxes = torch.cat([b["crop_boxes"] for b in T.image_loader(ds, SeededAugment(boxes_tf, seed=5), 12, 0)])
    assert 0 < boxes[:, 4].sum() < 12 and len(set(map(tuple, boxes[:, 2:4].tolist()))) > 1  # flips and sizes vary


def test_augment_on_device_refuses_other_augmentations_and_images_decoded_per_read(monkeypatch):
    with pytest.raises(UserError, match="not --augment crop_flip; drop --augment_on_device or use --augment rrc_flip"):
        T.resolve_augment("crop_flip", True, cached_head=False)
    assert T.resolve_augment(None, True, cached_head=False) == "rrc_flip"
    with pytest.raises(UserError, match="--augment_on_device does not apply to --method head with cached features"):
        T.resolve_augment(None, True, cached_head=True)
    train_tf, _ = T.image_transforms(_Spec, "rrc_flip")
    assert T.on_device_augment(False, train_tf) == (train_tf, None)
    monkeypatch.setattr(data_images, "SMALL_IMAGE_PIXELS", 0)  # as for ImageNet-size images
    monkeypatch.setattr(data_images, "_DECODED", {})
    ds = image_dataset([Image.new("RGB", (40, 40))] * 3, [0, 1, 2])
    loader = T.image_loader(ds, SeededAugment(T.on_device_augment(True, train_tf)[0], 0), 3, 0)
    with pytest.raises(UserError, match="needs a split of small images of one size"):
        T.check_on_device_augment(loader)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_resize_in_pil_order_is_the_cpu_uint8_kernel_within_two_grey_levels(interpolation):
    """Off CPU, --augment_on_device resizes with resize_in_pil_order: torchvision's own uint8 resize there is one
    float pass, which for bicubic lands far from the CPU kernel (and PIL) on high-contrast crops."""
    from torchvision.transforms.v2 import InterpolationMode, functional as TF

    from lt_utils.transforms import resize_in_pil_order

    mode = InterpolationMode(interpolation)
    g = torch.Generator().manual_seed(0)
    worst, differing, total, one_pass_worst = 0, 0, 0, 0
    for i in range(60):
        image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g)  # noise: the worst case
        h, w = (int(v) for v in torch.randint(3, 33, (2,), generator=g))
        size = 24 if i % 4 == 0 else 224  # down- and upsampling
        crop = image[:, :h, :w]
        kernel = TF.resize(crop, [size, size], interpolation=mode, antialias=True).int()
        ours = resize_in_pil_order(crop, size, mode)
        assert ours.dtype == torch.uint8 and ours.shape == (3, size, size)
        diff = (ours.int() - kernel).abs()
        worst, differing, total = max(worst, int(diff.max())), differing + int((diff > 0).sum()), total + diff.numel()
        one_pass = TF.resize(crop.float(), [size, size], interpolation=mode, antialias=True).clamp(0, 255).round()
        one_pass_worst = max(one_pass_worst, int((one_pass.int() - kernel).abs().max()))
    assert worst <= 2 and differing / total < 0.02, (worst, differing / total)
    if interpolation == "bicubic":
        assert one_pass_worst > 10  # what torchvision's CUDA path would have given


def test_device_augment_off_cpu_takes_the_pil_order_resize():
    train_tf, _ = T.image_transforms(_Spec, "rrc_flip")
    _, on_device = T.on_device_augment(True, train_tf)
    batch = {"pixel_values": torch.empty(3, 3, 28, 28, dtype=torch.uint8, device="meta"),
             "crop_boxes": torch.tensor([[0, 0, 28, 28, 0], [2, 3, 10, 12, 1], [5, 0, 20, 9, 0]])}
    out = on_device(batch)
    assert out.device.type == "meta" and out.shape == (3, 3, SIZE, SIZE) and out.dtype == torch.float32
