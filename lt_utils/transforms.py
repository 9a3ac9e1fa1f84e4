"""Image transforms for training, evaluation and test-time ensembling (TTE), plus collate.

Resizing runs on PIL images, as HF image processors do (CLIP's preprocessing is PIL bicubic);
crops, flips and normalisation run on tensors. All transforms are picklable for DataLoader workers.

TTE (LIFT): resize the shorter side to `image_size + tte_expand(image_size, patch_size)`, take the
four corner crops and the centre crop, run all views through the model as one batch and average
the *logits*. The 1.5-patch expand offsets the corner crops by a non-integer number of patches.
"""
import dataclasses
import zlib

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .errors import UserError
from .registry import Registry

# `--tte`: f(TTEViews) -> a transform of one image to its [V, 3, H, W] views (logits are averaged over V)
TTE_MODES = Registry("TTE mode", flag="--tte")


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

    @property
    def margin(self):
        return tte_expand(self.image_size, self.patch_size) if self.expand is None else int(self.expand)


def _resized_views(resize, crop, add_flips):
    def build(v):
        return v2.Compose([ToRGB(), v2.Resize(resize(v), interpolation=_interpolation(v.interpolation)),
                           *_to_normalized_tensor(v.mean, v.std), MultiView(crop(v), add_flips=add_flips)])

    return build


TTE_MODES.register("fivecrop", _resized_views(lambda v: v.image_size + v.margin, lambda v: v2.FiveCrop(v.image_size), False))
TTE_MODES.register("tencrop", _resized_views(lambda v: v.image_size + v.margin, lambda v: v2.FiveCrop(v.image_size), True))
TTE_MODES.register("flip", _resized_views(lambda v: v.image_size * 8 // 7, lambda v: v2.CenterCrop(v.image_size), True))


@TTE_MODES.register("randaug")
def _random_views(v):
    """LIFT's randaug TTE: `views` independent RandomResizedCrop (scale 0.08-1) + flip views of the original image."""
    return v2.Compose([ToRGB(), RandomViews(build_train_transform(v.image_size, v.mean, v.std, v.interpolation),
                                            v.views, v.seed)])


_INTERPOLATIONS = {
    "nearest": v2.InterpolationMode.NEAREST,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
}


def tte_expand(image_size, patch_size):
    """Pixels added before five-cropping: 1.5 patches, rounded half up (24 for /16, 21 for /14)."""
    del image_size  # the LIFT rule depends on the patch only; kept in the signature for callers
    return (3 * int(patch_size) + 1) // 2


def build_train_transform(image_size, mean, std, interpolation="bicubic"):
    """RandomResizedCrop (scale 0.08-1) + horizontal flip + normalise: LIFT's only augmentation."""
    return v2.Compose(
        [
            ToRGB(),
            v2.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=_interpolation(interpolation)),
            v2.RandomHorizontalFlip(),
            *_to_normalized_tensor(mean, std),
        ]
    )


def build_eval_transform(image_size, mean, std, interpolation="bicubic"):
    """Resize the shorter side to image_size * 8 // 7 (256 for 224), centre crop, normalise."""
    return v2.Compose(
        [
            ToRGB(),
            v2.Resize(image_size * 8 // 7, interpolation=_interpolation(interpolation)),
            v2.CenterCrop(image_size),
            *_to_normalized_tensor(mean, std),
        ]
    )


def build_tte_transform(mode, image_size, patch_size, mean, std, interpolation="bicubic", views=1, expand=None, seed=0):
    """One image -> a [V, 3, H, W] tensor of views: fivecrop V=5, tencrop V=10, flip V=2, randaug V=views.

    fivecrop order: top-left, top-right, bottom-left, bottom-right, centre (torchvision FiveCrop);
    tencrop and flip append the horizontal flip of each view in the same order.
    """
    if int(views) < 1:
        raise UserError(f"--tte_views must be >= 1, got {views}")
    if expand is not None and int(expand) < 0:
        raise UserError(f"--tte_expand must be >= 0 pixels, got {expand}")
    return TTE_MODES.get(mode)(TTEViews(image_size, patch_size, mean, std, interpolation, int(views), expand, seed))


class RandomViews:
    """`views` draws of a random transform of one PIL image, seeded by (seed, the image's pixels): the same views
    whatever the order, the batch or the number of processes."""

    def __init__(self, transform, views, seed=0):
        self.transform, self.views, self.seed = transform, views, seed

    def __call__(self, image):
        key = zlib.crc32(image.tobytes(), zlib.crc32(f"{image.size}{image.mode}".encode()))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 4_294_967_311 + key)
            return torch.stack([self.transform(image) for _ in range(self.views)])


class ToRGB:
    """PIL (L/RGB/RGBA/P/...) or HWC uint8 array -> RGB PIL image."""

    def __call__(self, image):
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise UserError(
                f"expected a PIL image or uint8 array, got {type(image).__name__}; check --image_column_name"
            )
        return image.convert("RGB")


class MultiView:
    """Crop one image tensor into views (plus their horizontal flips) stacked as [V, 3, H, W]."""

    def __init__(self, crop, add_flips):
        self.crop = crop
        self.add_flips = add_flips

    def __call__(self, image):
        views = self.crop(image)
        views = list(views) if isinstance(views, (tuple, list)) else [views]
        if self.add_flips:
            views += [TF.horizontal_flip(view) for view in views]
        return torch.stack(views)


class ApplyTransform:
    """Batch transform for `datasets.Dataset.set_transform` / `with_transform`.

    {"image": [...], "label": [...]} -> {"pixel_values": [tensors], "labels": [ints]}.
    A class rather than a closure so DataLoader workers can pickle it.
    """

    def __init__(self, transform, image_column="image", label_column="label"):
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column

    def __call__(self, batch):
        for column in (self.image_column, self.label_column):
            if column not in batch:
                raise UserError(
                    f"column {column!r} not in the dataset (has {sorted(batch)}); "
                    "set --image_column_name / --label_column_name"
                )
        return {
            "pixel_values": [self.transform(image) for image in batch[self.image_column]],
            "labels": [int(label) for label in batch[self.label_column]],
        }


def collate(batch):
    """List of {"pixel_values", "labels"} -> pixel_values [B, 3, H, W] (or [B, V, 3, H, W]) and labels [B]."""
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in batch]),
        "labels": torch.tensor([example["labels"] for example in batch], dtype=torch.long),
    }


def _interpolation(name):
    if name not in _INTERPOLATIONS:
        raise UserError(f"unknown interpolation {name!r}; choose one of {', '.join(_INTERPOLATIONS)}")
    return _INTERPOLATIONS[name]


def _to_normalized_tensor(mean, std):
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
        v2.ToPureTensor(),
    ]
