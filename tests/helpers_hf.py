"""Tiny image-classification sources in the layouts `datasets` writes (save_to_disk arrow, parquet shards,
imagefolder + metadata.csv), with non-default column names (`img`, `fine_label`). Every image's pixels spell its
index in its source split (`decode_index`), so a test can name exactly which source images a split holds."""
import csv
from pathlib import Path

import datasets
import numpy as np
import PIL.Image

from helpers_data import decode_index  # noqa: F401  (re-exported for the tests)

CLASS_NAMES = ["apple", "bear", "cat", "dog"]
PER_CLASS = {"train": 30, "validation": 3, "test": 5}
SIZE = 8


def index_image(i):
    return np.broadcast_to(np.asarray([(i >> 16) & 255, (i >> 8) & 255, i & 255], dtype=np.uint8), (SIZE, SIZE, 3)).copy()


def source_labels(split, seed=0):
    """Labels of a source split in a shuffled (CIFAR-like) order."""
    rng = np.random.default_rng(seed + len(split))
    return rng.permutation(np.repeat(np.arange(len(CLASS_NAMES)), PER_CLASS[split]))


def source_dict(splits=("train", "test")):
    feats = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=CLASS_NAMES),
                               "note": datasets.Value("string")})
    out = {}
    for split in splits:
        labels = source_labels(split)
        out[split] = datasets.Dataset.from_dict(
            {"img": [PIL.Image.fromarray(index_image(i)) for i in range(len(labels))], "fine_label": labels.tolist(),
             "note": [f"{split}{i}" for i in range(len(labels))]}, features=feats)
    return datasets.DatasetDict(out)


def write_arrow(root, splits=("train", "test")):
    """`DatasetDict.save_to_disk`: dataset_dict.json + one arrow folder per split."""
    source_dict(splits).save_to_disk(str(root))
    return Path(root)


def write_parquet(root, splits=("train", "test"), shards=2):
    """The Hub's parquet layout: data/<split>-0000k-of-0000n.parquet, the train split in `shards` shards."""
    dd = source_dict(splits)
    (Path(root) / "data").mkdir(parents=True)
    for split, part in dd.items():
        n = shards if split == "train" else 1
        for k in range(n):
            part.shard(n, k, contiguous=True).to_parquet(str(Path(root) / "data" / f"{split}-{k:05d}-of-{n:05d}.parquet"))
    return Path(root)


def write_imagefolder(root, splits=("train", "test")):
    """imagefolder: <split>/<file>.png + <split>/metadata.csv (file_name, fine_label as class-name strings)."""
    for split in splits:
        folder = Path(root) / split
        folder.mkdir(parents=True)
        labels = source_labels(split)
        with open(folder / "metadata.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file_name", "fine_label"])
            for i, y in enumerate(labels):
                PIL.Image.fromarray(index_image(i)).save(folder / f"{i:04d}.png")
                writer.writerow([f"{i:04d}.png", CLASS_NAMES[y]])
    (Path(root) / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    return Path(root)


def first_n(labels, counts):
    """Source indices of the first counts[c] images of each class, ascending (`--selection first`)."""
    labels = np.asarray(labels)
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:n] for c, n in enumerate(counts)]))


def held_indices(ds_split):
    return [decode_index(im) for im in ds_split["image"]]
