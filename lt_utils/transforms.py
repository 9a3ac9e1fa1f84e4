"""Image transforms for training, evaluation and test-time ensembling (TTE), plus collate.

Training resizes PIL images; the evaluation view resizes uint8 tensors (antialiased) and centre-crops with
floored offsets, exactly as transformers' (torchvision) image processors do, so an export's
preprocessor_config.json gives the same pixels. Crops, flips and normalisation run on tensors. All transforms are picklable for DataLoader workers.

TTE (LIFT): resize the shorter side to `image_size + tte_expand(image_size, patch_size)`, take the
four corner crops and the centre crop, run all views through the model as one batch and average
the *logits*. The 1.5-patch expand offsets the corner crops by a non-integer number of patches.
"""
import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .errors import UserError
from .registry import Registry

# `--tte`: (image_size, patch_size) -> (shorter side to resize to, crop of the views, add the flipped views)
TTE_MODES = Registry("TTE mode", flag="--tte")
TTE_MODES.register("fivecrop", lambda size, patch: (size + tte_expand(size, patch), v2.FiveCrop(size), False))
TTE_MODES.register("tencrop", lambda size, patch: (size + tte_expand(size, patch), v2.FiveCrop(size), True))
TTE_MODES.register("flip", lambda size, patch: (size * 8 // 7, v2.CenterCrop(size), True))

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
    """Resize the shorter side to image_size * 8 // 7 (256 for 224), centre crop, normalise.

    The pixels of transformers' image processor of an export (hub_files.image_processor), which is tested.
    """
    return v2.Compose(
        [
            ToRGB(),
            v2.ToImage(),
            v2.Resize(image_size * 8 // 7, interpolation=_interpolation(interpolation), antialias=True),
            CenterCropFloor(image_size),
            *_to_normalized_tensor(mean, std)[1:],
        ]
    )


class CenterCropFloor:
    """Centre crop with offsets (H - h) // 2, (W - w) // 2, as transformers' image processors (torchvision rounds)."""

    def __init__(self, size):
        self.size = int(size)

    def __call__(self, image):
        h, w = image.shape[-2:]
        top, left = (h - self.size) // 2, (w - self.size) // 2
        return image[..., top:top + self.size, left:left + self.size]


def build_tte_transform(mode, image_size, patch_size, mean, std, interpolation="bicubic"):
    """One image -> a [V, 3, H, W] tensor of views: fivecrop V=5, tencrop V=10, flip V=2.

    fivecrop order: top-left, top-right, bottom-left, bottom-right, centre (torchvision FiveCrop);
    tencrop and flip append the horizontal flip of each view in the same order.
    """
    resize, crop, add_flips = TTE_MODES.get(mode)(image_size, patch_size)
    return v2.Compose(
        [
            ToRGB(),
            v2.Resize(resize, interpolation=_interpolation(interpolation)),
            *_to_normalized_tensor(mean, std),
            MultiView(crop, add_flips=add_flips),
        ]
    )


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
