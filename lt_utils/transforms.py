"""Image transforms for training, evaluation and test-time ensembling (TTE), plus collate.

Everything runs on uint8 [3, H, W] tensors (a PIL image is converted first): crops are slices, and resizing is
torchvision's antialiased tensor resize, whose bicubic kernel is PIL's (a = -0.5; within 2 grey levels of the
PIL bicubic of CLIP's image processor). Training augmentation draws from a torch.Generator it is given
(`SeededAugment` seeds one per sample), never from the global RNG. All transforms are picklable for DataLoader
workers.

TTE (LIFT): resize the shorter side to `image_size + tte_expand(image_size, patch_size)`, take the
four corner crops and the centre crop, run all views through the model as one batch and average
the *logits*. The 1.5-patch expand offsets the corner crops by a non-integer number of patches.
"""
import dataclasses
import math
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .axes import TTE_MODES  # the --tte names; their builders are below
from .errors import UserError



@dataclasses.dataclass
class TTEViews:
    image_size: int
    patch_size: int
    mean: list
    std: list
    interpolation: str = "bicubic"
    views: int = 1  # randaug: how many random views (LIFT's randaug_times, default 1)
    expand: int = None  # five-crop margin in pixels; None: 1.5 patches (LIFT: 24 for /16)
    seed: int = 0  # randaug: views are drawn from (seed, image content), the same on any number of processes
    resize: int = None  # the eval view's shorter side (None: image_size * 8 // 7); flip resizes like the eval view

    @property
    def margin(self):
        return tte_expand(self.image_size, self.patch_size) if self.expand is None else int(self.expand)


def _resized_views(resize, crop, add_flips):
    def build(v):
        return v2.Compose([ToRGB(), v2.Resize(resize(v), interpolation=_interpolation(v.interpolation), antialias=True),
                           Normalize255(v.mean, v.std), MultiView(crop(v), add_flips=add_flips)])

    return build


_five_crop = _resized_views(lambda v: v.image_size + v.margin, lambda v: v2.FiveCrop(v.image_size), False)
_ten_crop = _resized_views(lambda v: v.image_size + v.margin, lambda v: v2.FiveCrop(v.image_size), True)
_flip = _resized_views(lambda v: v.resize or v.image_size * 8 // 7, lambda v: v2.CenterCrop(v.image_size), True)


def _random_views(v):
    """LIFT's randaug TTE: `views` independent RandomResizedCrop (scale 0.08-1) + flip views of the original image."""
    return RandomViews(build_train_transform(v.image_size, v.mean, v.std, v.interpolation), v.views, v.seed)


_INTERPOLATIONS = {
    "nearest": v2.InterpolationMode.NEAREST,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
}


def tte_expand(image_size, patch_size):
    """Pixels added before five-cropping: 1.5 patches, rounded half up (24 for /16, 21 for /14)."""
    del image_size  # the LIFT rule depends on the patch only; kept in the signature for callers
    return (3 * int(patch_size) + 1) // 2


class PaddedCropFlip:
    """The CIFAR papers' augmentation (LOS, LDAM): the eval view (uint8), zero-padded by 4 px, a random crop of the
    original size and a horizontal flip, both drawn from the generator; then normalised (padding is black, as in
    torchvision's RandomCrop(32, padding=4) on the PIL image). Called as `transform(image, generator)`."""

    def __init__(self, image_size, mean, std, interpolation="bilinear", resize=None, padding=4):
        self.size, self.padding = image_size, padding
        self.view = v2.Compose([ToRGB(), v2.Resize(resize or image_size * 8 // 7, interpolation=_interpolation(interpolation),
                                                   antialias=True), CenterCropFloor(image_size)])
        self.normalize = Normalize255(mean, std)

    def __call__(self, image, generator):
        image = TF.pad(self.view(image), [self.padding] * 4, fill=0)
        top, left = (int(v) for v in torch.randint(0, 2 * self.padding + 1, (2,), generator=generator))
        flip = bool(torch.rand(1, generator=generator) < 0.5)
        out = image[..., top:top + self.size, left:left + self.size]
        return self.normalize(out.flip(-1) if flip else out)


def build_train_transform(image_size, mean, std, interpolation="bicubic"):
    """RandomResizedCrop (scale 0.08-1) + horizontal flip + normalise: LIFT's only augmentation.

    Called as `transform(image, generator)`; the crop box and the flip are drawn from `generator`.
    """
    return RandomResizedCropFlip(image_size, mean, std, _interpolation(interpolation))


class RandomResizedCropFlip:
    """torchvision's RandomResizedCrop box rule (10 tries, then a centre crop of the clamped ratio) + a flip, drawn
    from a given generator, on uint8. The crop is resized and flipped in uint8, then converted and normalised in one
    pass: a 32 px CIFAR image is never a float image until it is 224 px."""

    def __init__(self, size, mean, std, interpolation, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.interpolation, self.scale = int(size), interpolation, scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.ratio = ratio
        self.normalize = Normalize255(mean, std)
        self.to_rgb = ToRGB()

    def crop_box(self, height, width, generator):
        area = height * width
        for _ in range(10):
            u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
            target_area = area * (self.scale[0] + u[0] * (self.scale[1] - self.scale[0]))
            aspect = math.exp(self.log_ratio[0] + u[1] * (self.log_ratio[1] - self.log_ratio[0]))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1)), h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def draw(self, image, generator):
        """One sample's (top, left, height, width, flip): the crop box, then the flip."""
        top, left, h, w = self.crop_box(*image.shape[-2:], generator)
        return top, left, h, w, bool(torch.rand(1, generator=generator) < 0.5)

    def resize_flip(self, image, top, left, h, w, flip):
        out = TF.resized_crop(image, top, left, h, w, [self.size, self.size], interpolation=self.interpolation,
                              antialias=True)
        return out.flip(-1) if flip else out

    def __call__(self, image, generator):
        image = self.to_rgb(image)
        return self.normalize(self.resize_flip(image, *self.draw(image, generator)))


class CropBoxes:
    """--augment_on_device, loader side: the RGB uint8 image at its own size and the (top, left, height, width,
    flip) that `RandomResizedCropFlip` draws from the generator; `DeviceResizedCropFlip` finishes the batch."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image, generator):
        image = self.transform.to_rgb(image)
        return {"pixel_values": image, "crop_boxes": torch.tensor(self.transform.draw(image, generator))}


class DeviceResizedCropFlip:
    """--augment_on_device, accelerator side: crops, resizes, flips and normalises a batch of small uint8 images
    where the batch lives, with the boxes the loader drew. On CPU the pixels equal `RandomResizedCropFlip`'s bit
    for bit (the same torchvision kernel); on other devices the resize is `resize_in_pil_order`, within 2 grey
    levels of that kernel. The loader's work per image shrinks to drawing the box (no 224 px resize, and a 32 px
    uint8 image crosses to the device instead of a 224 px float one)."""

    def __init__(self, transform):
        self.transform = transform

    def resize_flip(self, image, top, left, h, w, flip):
        if image.device.type == "cpu":
            return self.transform.resize_flip(image, top, left, h, w, flip)
        out = resize_in_pil_order(image[:, top:top + h, left:left + w], self.transform.size, self.transform.interpolation)
        return out.flip(-1) if flip else out

    def __call__(self, batch):
        images = batch["pixel_values"]
        views = [self.resize_flip(image, *box) for image, box in zip(images, batch["crop_boxes"].tolist())]
        return self.transform.normalize(torch.stack(views))


def resize_in_pil_order(image, size, interpolation):
    """uint8 [3, h, w] -> uint8 [3, size, size] the way torchvision's CPU uint8 kernel (and PIL) resize: a horizontal
    pass rounded to uint8, then a vertical one, antialiased. On CUDA torchvision resizes uint8 in one float pass,
    whose bicubic overshoot is never clipped between passes: up to ~28 grey levels from the CPU kernel on
    high-contrast images. This stays within 2 (float32 weights vs the kernel's fixed point)."""
    if interpolation == v2.InterpolationMode.NEAREST:  # no filter, nothing to round: the same on every device
        return TF.resize(image, [size, size], interpolation=interpolation)
    x = image[None].to(torch.float32)
    for shape in ((x.shape[-2], size), (size, size)):
        x = F.interpolate(x, size=shape, mode=interpolation.value, align_corners=False, antialias=True)
        x = x.clamp_(0, 255).round_()
    return x[0].to(torch.uint8)


class RandomFlip:
    """A deterministic view (e.g. the eval transform), mirrored with probability 1/2 drawn from the generator."""

    def __init__(self, view):
        self.view = view

    def __call__(self, image, generator):
        flip = bool(torch.rand(1, generator=generator) < 0.5)
        out = self.view(image)
        return out.flip(-1) if flip else out


class NoAugment:
    """The deterministic view; takes (and ignores) the generator like the random training transforms."""

    def __init__(self, view):
        self.view = view

    def __call__(self, image, generator):
        return self.view(image)


class Normalize255:
    """uint8 [3, H, W] (or a [B, 3, H, W] batch, on any device) -> float32 (x / 255 - mean) / std, as one subtract
    and one divide on the float copy."""

    def __init__(self, mean, std):
        self.mean = torch.tensor([255.0 * m for m in mean]).view(3, 1, 1)
        self.std = torch.tensor([255.0 * s for s in std]).view(3, 1, 1)

    def __call__(self, image):
        # .to() returns the same tensor on the CPU loader path; --augment_on_device batches live on the accelerator
        return image.to(torch.float32).sub_(self.mean.to(image.device)).div_(self.std.to(image.device))


def sample_seed(seed, epoch, sample_id):
    """The seed of one sample's augmentation in one epoch."""
    return ((int(seed) * 1_000_003 + int(epoch)) * 100_000_007 + int(sample_id)) % (2**62)


class SeededAugment:
    """Training augmentation drawn from (seed, epoch, sample id) instead of the global RNG.

    Each sample gets its own torch.Generator seeded by `sample_seed`, so the same image gets the same crop whatever
    the number of processes or workers, however far the loader prefetches, and after a mid-epoch resume; so resumed
    and distributed runs reproduce single-process ones. The epoch lives in shared memory: set `.epoch` before
    iterating, and persistent workers (kept alive across epochs) see it.
    """

    def __init__(self, transform, seed):
        self.transform, self.seed = transform, seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self):
        return int(self._epoch)

    @epoch.setter
    def epoch(self, value):
        self._epoch.fill_(int(value))

    def __call__(self, image, sample_id):
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, sample_id))
        return self.transform(image, generator)


def build_eval_transform(image_size, mean, std, interpolation="bicubic", resize=None):
    """Resize the shorter side to `resize` (default image_size * 8 // 7: 256 for 224), centre crop, normalise.

    The pixels of transformers' image processor of an export (hub_files.image_processor; tested), so the model loaded
    from the Hub sees what eval_lt.py sees.
    """
    return v2.Compose(
        [
            ToRGB(),
            v2.Resize(resize or image_size * 8 // 7, interpolation=_interpolation(interpolation), antialias=True),
            CenterCropFloor(image_size),
            Normalize255(mean, std),
        ]
    )


def build_plain_transform(image_size, mean, std, interpolation="bicubic"):
    """The head-init view (LIFT's): the shorter side resized to `image_size` and the centre crop, offset rounded as
    torchvision's CenterCrop, so the whole image but the longer side's ends is seen (the eval view also drops 1/8 of
    the shorter side)."""
    return v2.Compose([ToRGB(), v2.Resize(image_size, interpolation=_interpolation(interpolation), antialias=True),
                       v2.CenterCrop(image_size), Normalize255(mean, std)])


def build_tte_transform(mode, image_size, patch_size, mean, std, interpolation="bicubic", views=1, expand=None, seed=0,
                        resize=None):
    """One image -> a [V, 3, H, W] tensor of views: fivecrop V=5, tencrop V=10, flip V=2, randaug V=views.

    fivecrop order: top-left, top-right, bottom-left, bottom-right, centre (torchvision FiveCrop);
    tencrop and flip append the same crops of the mirrored image (torchvision's TenCrop order).
    """
    if int(views) < 1:
        raise UserError(f"--tte_views must be >= 1, got {views}")
    if expand is not None and int(expand) < 0:
        raise UserError(f"--tte_expand must be >= 0 pixels, got {expand}")
    return TTE_MODES.get(mode)(TTEViews(image_size, patch_size, mean, std, interpolation, int(views), expand, seed,
                                               resize))


class RandomViews:
    """`views` draws of a random transform f(image, generator) of one image, from a generator seeded by (seed, the
    image's pixels): the same views whatever the order, the batch or the number of processes."""

    def __init__(self, transform, views, seed=0):
        self.transform, self.views, self.seed = transform, views, seed
        self.to_rgb = ToRGB()

    def __call__(self, image):
        image = self.to_rgb(image)
        key = zlib.crc32(image.contiguous().numpy().tobytes(), zlib.crc32(str(tuple(image.shape)).encode()))
        generator = torch.Generator().manual_seed(self.seed * 4_294_967_311 + key)
        return torch.stack([self.transform(image, generator) for _ in range(self.views)])


class CenterCropFloor:
    """Centre crop with offsets (H - h) // 2, (W - w) // 2, as transformers' image processors (torchvision rounds)."""

    def __init__(self, size):
        self.size = int(size)

    def __call__(self, image):
        h, w = image.shape[-2:]
        top, left = (h - self.size) // 2, (w - self.size) // 2
        return image[..., top:top + self.size, left:left + self.size]


class ToRGB:
    """PIL (L/RGB/RGBA/P/16-bit/float ...), HWC array or [C, H, W] tensor -> RGB uint8 [3, H, W] tensor; 16-bit and
    float values are scaled to 8 bits (`to_uint8`), never clipped."""

    def __call__(self, image):
        if isinstance(image, torch.Tensor):
            if image.dtype != torch.uint8:
                image = torch.from_numpy(to_uint8(image.numpy()))
            return image if image.shape[0] == 3 else image[:1].expand(3, -1, -1)
        if isinstance(image, np.ndarray):
            image = Image.fromarray(to_uint8(image))
        if not isinstance(image, Image.Image):
            raise UserError(
                f"expected a PIL image or an array, got {type(image).__name__}; check --image_column_name"
            )
        return torch.from_numpy(np.array(to_rgb_image(image))).permute(2, 0, 1)


def to_rgb_image(image):
    """A PIL image of any mode as an RGB one: the one decoding of training, evaluation and predict.py (16-bit and
    float pixels scaled by `to_uint8`, not clipped to white by PIL's convert)."""
    if is_high_depth(image):
        image = Image.fromarray(to_uint8(np.asarray(image)))
    return image.convert("RGB")


def is_high_depth(image):
    """A PIL image of 16-bit or 32-bit integer or float pixels (modes I;16*, I, F)."""
    return isinstance(image, Image.Image) and (image.mode in ("I", "F") or image.mode.startswith("I;16"))


def to_uint8(array):
    """8-bit values of an image array: PIL's convert("RGB") clips 16-bit and float images (all white), so scale
    them here. Integers: the full range of 16 bits (0..65535 -> 0..255); floats: [0, 1] (or [0, 255] when larger)."""
    array = np.asarray(array)
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        top = 255 if array.dtype.itemsize == 1 else 65535
        scaled = array.astype(np.float64) * (255.0 / top)
    else:
        values = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        scaled = values * 255.0 if values.size == 0 or values.max() <= 1.0 else values
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


class MultiView:
    """Crop one image tensor into views (plus the same crops of its mirror image) stacked as [V, 3, H, W].

    The mirrored views are crops of the mirrored image, as torchvision's TenCrop takes them: where the centre crop's
    margin is odd, its rounded offset lands 1 px elsewhere than on the mirror of the unmirrored crop."""

    def __init__(self, crop, add_flips):
        self.crop = crop
        self.add_flips = add_flips

    def __call__(self, image):
        views = self._views(image)
        if self.add_flips:
            views += self._views(TF.horizontal_flip(image))
        return torch.stack(views)

    def _views(self, image):
        views = self.crop(image)
        return list(views) if isinstance(views, (tuple, list)) else [views]


def collate(batch):
    """List of {"pixel_values", "labels"[, "crop_boxes"]} -> pixel_values [B, 3, H, W] (or [B, V, 3, H, W]),
    labels [B] (and crop_boxes [B, 5] under --augment_on_device)."""
    out = {key: torch.stack([example[key] for example in batch]) for key in batch[0] if key != "labels"}
    out["labels"] = torch.tensor([example["labels"] for example in batch], dtype=torch.long)
    return out


def _interpolation(name):
    if name not in _INTERPOLATIONS:
        raise UserError(f"unknown interpolation {name!r}; choose one of {', '.join(_INTERPOLATIONS)}")
    return _INTERPOLATIONS[name]
