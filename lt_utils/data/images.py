"""A split's images for the DataLoader: small images (CIFAR, Fashion-MNIST) decoded once into one uint8 array.

The `datasets` splits store encoded images (PNG for CIFAR and Fashion-MNIST). Decoding a 32 px PNG costs about as
much as augmenting it, so splits of small images of one size are decoded once per process into an [N, H, W, C]
uint8 array (CIFAR-100-LT: 33 MB) and every epoch reads slices of it; larger images (ImageNet-LT, iNaturalist) are
decoded when read. Either way a sample is a uint8 [C, H, W] tensor and its row index, which is its sample id for
seeded augmentation.
"""
import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UserError
from ..transforms import is_high_depth, to_uint8

SMALL_IMAGE_PIXELS = 64 * 64  # decode up front at most this many pixels per image ...
MAX_DECODED_BYTES = 2 << 30  # ... and this much memory per split
_DECODED = {}  # dataset fingerprint -> array: the train split is decoded once for the head init and the training


class ImageSplit(Dataset):
    """{"pixel_values", "labels"} items of a `datasets` split with `transform` applied.

    `transform(image)` for evaluation, or `transform(image, sample_id)` when `seeded` (training: `SeededAugment`).
    """

    def __init__(self, dataset, transform, seeded=False, image_column="image", label_column="label"):
        for column in (image_column, label_column):
            if column not in dataset.column_names:
                raise UserError(f"column {column!r} not in the dataset (has {sorted(dataset.column_names)}); "
                                "set --image_column_name / --label_column_name")
        self.transform, self.seeded = transform, seeded
        self.labels = np.asarray(dataset[label_column], dtype=np.int64)
        self.array = decoded_array(dataset, image_column)
        self.dataset = dataset.select_columns([image_column]) if self.array is None else None
        self.image_column = image_column

    def __len__(self):
        return len(self.labels)

    def image(self, index):
        if self.array is not None:
            return torch.from_numpy(self.array[index]).permute(2, 0, 1)
        return self.dataset[int(index)][self.image_column]

    def __getitem__(self, index):
        image = self.image(index)
        out = self.transform(image, int(index)) if self.seeded else self.transform(image)
        # a transform returns pixel_values, or a dict of them and more (--augment_on_device: the crop boxes)
        return {**(out if isinstance(out, dict) else {"pixel_values": out}), "labels": int(self.labels[index])}


def decoded_array(dataset, image_column="image"):
    """[N, H, W, C] uint8 of a split of small images of one size and mode (cached per process); None otherwise."""
    if len(dataset) == 0:
        return None
    key = (getattr(dataset, "_fingerprint", None), image_column)
    if key[0] is not None and key in _DECODED:
        return _DECODED[key]
    first = to_hwc(dataset[0][image_column])
    if first is None or first.shape[0] * first.shape[1] > SMALL_IMAGE_PIXELS or \
            first.nbytes * len(dataset) > MAX_DECODED_BYTES:
        return None
    array = np.empty((len(dataset), *first.shape), dtype=np.uint8)
    for start in range(0, len(dataset), 1024):
        for offset, image in enumerate(dataset[start:start + 1024][image_column]):
            decoded = to_hwc(image)
            if decoded is None or decoded.shape != first.shape:
                return None  # mixed sizes or modes: decode when read
            array[start + offset] = decoded
    if key[0] is not None:
        _DECODED[key] = array
    return array


def to_hwc(image):
    """A PIL image in L or RGB mode, or a 16-bit / float grayscale one (scaled to 8 bits, not clipped: see
    transforms.to_uint8), as an [H, W, C] uint8 array; None for other modes (converted when read)."""
    if is_high_depth(image):
        array = to_uint8(np.asarray(image))
    elif getattr(image, "mode", None) in ("L", "RGB"):
        array = np.asarray(image, dtype=np.uint8)
    else:
        return None
    return array[:, :, None] if array.ndim == 2 else array
