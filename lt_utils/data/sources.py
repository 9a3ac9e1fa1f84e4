"""Readers for the raw sources of the LT builders: CIFAR pickles, IDX files, OLTR txt lists, image folders, the Hub.

Each reader returns a `Source` (source_base.py); the Hub copies of the built-ins are read by hf_source.py's generic
reader. Nothing here decides the LT split.
"""
import dataclasses
import gzip
import hashlib
import os
import pickle
import re
from pathlib import Path

import numpy as np

from ..errors import UserError
from .hf_source import HFSpec, SourceUnavailable, read_hf_source
from .source_base import (ArrayImages, FileImages, Source, SourceSplit, check_label_range, read_class_names,
                          require_file)

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def fingerprint(paths, *extra):
    """Hash of the source files' paths, sizes and modification times: a changed source gets a new cache entry."""
    h = hashlib.sha256(repr(extra).encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def require_dir(path, what):
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{what} {path} does not exist or is not a directory; pass the right --data_dir")
    return path


# ---------------------------------------------------------------- CIFAR


CIFAR_LAYOUT = {
    100: {"dir": "cifar-100-python", "train": ["train"], "test": ["test"], "meta": "meta",
          "labels": b"fine_labels", "names": b"fine_label_names"},
    10: {"dir": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
         "meta": "batches.meta", "labels": b"labels", "names": b"label_names"},
}
CIFAR_HUB = {100: ("uoft-cs/cifar100", "img", "fine_label"), 10: ("uoft-cs/cifar10", "img", "label")}


def cifar_files(data_dir, num_classes):
    """The pickle files of a local CIFAR copy: `data_dir` is the extracted folder or its parent."""
    layout = CIFAR_LAYOUT[num_classes]
    root = require_dir(data_dir, "CIFAR directory")
    if (root / layout["dir"]).is_dir():
        root = root / layout["dir"]
    names = layout["train"] + layout["test"] + [layout["meta"]]
    for name in names:
        if not (root / name).is_file():
            raise UserError(
                f"{root / name} not found; --data_dir must hold the extracted {layout['dir']}/ "
                f"(files {', '.join(names)}) of the original CIFAR-{num_classes} python archive"
            )
    return [root / n for n in names]


def _unpickle(path):
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise UserError(f"{path} is not a CIFAR python pickle ({err}); re-extract the original archive")


def _cifar_batches(paths, label_key):
    images, labels = [], []
    for p in paths:
        d = _unpickle(p)
        images.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(d[label_key])
    return np.concatenate(images), np.asarray(labels, dtype=np.int64)


def read_cifar_local(data_dir, num_classes):
    layout = CIFAR_LAYOUT[num_classes]
    files = cifar_files(data_dir, num_classes)
    root = files[0].parent
    names = [n.decode() for n in _unpickle(root / layout["meta"])[layout["names"]]]
    splits = {}
    for split in ("train", "test"):
        images, labels = _cifar_batches([root / n for n in layout[split]], layout["labels"])
        splits[split] = SourceSplit(labels, ArrayImages(images))
    return Source(names, splits, f"local:{root}")


def read_hub(repo, image_col, label_col, local_copy, cache_dir=None):
    """A built-in dataset's Hub copy: the generic `datasets` reader with the repo's column names. Failing, it says
    what to pass instead: --data_dir with `local_copy`."""
    spec = HFSpec(repo, test_split="test", image_column_name=image_col, label_column_name=label_col)
    try:
        source = read_hf_source(spec, cache_dir=cache_dir)[0]
    except SourceUnavailable as err:
        raise UserError(f"without --data_dir the images come from the Hub dataset {repo}, which could not be loaded "
                        f"({err.detail}); pass --data_dir <{local_copy}>, or run once with the Hub reachable (the "
                        "download is cached)") from None
    return dataclasses.replace(source, description=f"hub:{repo}")


def read_cifar(data_dir, num_classes, cache_dir=None):
    if data_dir is not None:
        return read_cifar_local(data_dir, num_classes)
    return read_hub(*CIFAR_HUB[num_classes], f"folder with {CIFAR_LAYOUT[num_classes]['dir']}/", cache_dir=cache_dir)


# ---------------------------------------------------------------- Fashion-MNIST (IDX)


FASHION_MNIST_HUB = ("zalando-datasets/fashion_mnist", "image", "label")
IDX_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def default_fashion_mnist_dir():
    """Debian's dataset-fashion-mnist location when installed, else None (then the Hub)."""
    return DEBIAN_FASHION_MNIST_DIR if (DEBIAN_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file() else None


def _idx_path(root, stem):
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise UserError(f"{root / stem}[.gz] not found; --data_dir must hold the four Fashion-MNIST IDX files")


def idx_files(data_dir):
    root = require_dir(data_dir, "IDX directory")
    return [_idx_path(root, stem) for pair in IDX_STEMS.values() for stem in pair]


def read_idx(path):
    """An IDX array (the MNIST file format): magic 0x0000 + dtype code 0x08 (uint8) + ndim, then big-endian dims."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise UserError(f"{path} cannot be read ({err}); re-download the IDX file")
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise UserError(f"{path} is not a uint8 IDX file (bad magic number); re-download it")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UserError(f"{path} holds {data.size} values, its header says {dims}; the file is truncated")
    return data.reshape(dims)


def read_fashion_mnist(data_dir, cache_dir=None):
    if data_dir is None:
        return read_hub(*FASHION_MNIST_HUB, "folder with the IDX files (train-images-idx3-ubyte.gz, ...)",
                        cache_dir=cache_dir)
    root = Path(data_dir)
    splits = {}
    for split, (img_stem, lbl_stem) in IDX_STEMS.items():
        images = read_idx(_idx_path(root, img_stem))
        labels = read_idx(_idx_path(root, lbl_stem)).astype(np.int64)
        if len(images) != len(labels):
            raise UserError(f"{root}: {img_stem} has {len(images)} images but {lbl_stem} {len(labels)} labels")
        splits[split] = SourceSplit(labels, ArrayImages(images))
    check_label_range(splits["train"].labels, len(FASHION_MNIST_CLASSES), root / IDX_STEMS["train"][1])
    return Source(list(FASHION_MNIST_CLASSES), splits, f"local:{root}")


# ---------------------------------------------------------------- OLTR txt lists


def parse_list(path):
    """`relative/path label` per line (OLTR format); blank lines skipped."""
    path = require_file(path, "list file")
    rel, labels = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
            raise UserError(f"{path}:{lineno}: expected 'relative/path label', got {line.strip()!r}")
        rel.append(parts[0].strip())
        labels.append(int(parts[1]))
    if not rel:
        raise UserError(f"{path} lists no images; expected lines 'relative/path label'")
    return rel, np.asarray(labels, dtype=np.int64)


def names_from_paths(rel_paths, labels, num_classes):
    """Fallback class names: the parent folder of each class's first listed image (a wnid, a Places folder, an iNat id)."""
    names = [f"class_{c}" for c in range(num_classes)]
    seen = set()
    for rel, y in zip(rel_paths, labels):
        if y not in seen:
            seen.add(y)
            names[y] = Path(rel).parent.name or names[y]
    return names


def relabel_by_sorted_name(class_names, lists):
    """LIFT's iNat relabelling: class ids become the rank of the class name in sorted order."""
    if len(set(class_names)) != len(class_names):
        raise UserError("class names are not unique, so they cannot define the label order; drop relabel_by_name")
    new_names = sorted(class_names)
    rank = {n: i for i, n in enumerate(new_names)}
    mapping = np.asarray([rank[n] for n in class_names], dtype=np.int64)
    return new_names, {k: (rel, mapping[labels]) for k, (rel, labels) in lists.items()}


def check_listed_files(root, rel_paths, list_path):
    for rel in rel_paths:
        if not (root / rel).is_file():
            raise UserError(f"{root / rel} (listed in {list_path}) does not exist; fix --data_dir or the list")


def read_oltr(root, lists, class_names_file=None, relabel_by_name=False):
    """`lists` maps split -> list-file path (None to skip)."""
    root = require_dir(root, "image root")
    parsed = {s: parse_list(p) for s, p in lists.items() if p is not None}
    if class_names_file is not None:
        names = read_class_names(class_names_file)
    else:
        num = 1 + max(int(labels.max()) for _, labels in parsed.values())
        names = names_from_paths(*parsed["train"], num)
    for s, (rel, labels) in parsed.items():
        check_label_range(labels, len(names), lists[s])
        check_listed_files(root, rel, lists[s])
    if relabel_by_name:
        names, parsed = relabel_by_sorted_name(names, parsed)
    splits = {
        s: SourceSplit(labels, FileImages([root / r for r in rel], lists[s])) for s, (rel, labels) in parsed.items()
    }
    return Source(names, splits, f"local:{root}")


# ---------------------------------------------------------------- folder per class


def list_image_folder(root, class_names=None):
    """Sorted (paths, labels) of a folder-per-class tree; class names = sorted folder names unless given."""
    root = require_dir(root, "image folder")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if class_names is None:
        class_names = folders
        if not class_names:
            raise UserError(f"{root} has no class sub-folders; expected {root}/<class name>/<image files>")
    unknown = sorted(set(folders) - set(class_names))
    if unknown:
        raise UserError(f"{root}/{unknown[0]} is not a class of the training folder; rename or remove it")
    paths, labels = [], []
    for label, name in enumerate(class_names):
        folder = root / name
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS) if folder.is_dir() else []
        paths.extend(files)
        labels.extend([label] * len(files))
    return class_names, paths, np.asarray(labels, dtype=np.int64)


def image_folder_files(*roots):
    files = []
    for root in roots:
        if root is not None:
            files.extend(list_image_folder(root)[1])
    return files


def read_image_folder(data_dir, test_dir=None, val_dir=None):
    names, paths, labels = list_image_folder(data_dir)
    splits = {"train": SourceSplit(labels, FileImages(paths, data_dir))}
    for split, root in (("test", test_dir), ("val", val_dir)):
        if root is not None:
            _, p, y = list_image_folder(root, names)
            splits[split] = SourceSplit(y, FileImages(p, root))
    return Source(names, splits, f"local:{Path(data_dir).resolve()}")
