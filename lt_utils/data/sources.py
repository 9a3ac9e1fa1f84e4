"""Readers for the raw sources of the LT builders: CIFAR pickles, IDX files, OLTR txt lists, image folders, the Hub.

Each reader returns a `Source` (source_base.py); the Hub copies of the built-ins are read by hf_source.py's generic
reader. Nothing here decides the LT split.
"""
import dataclasses
import gzip
import hashlib
import math
import os
import pickle
import re
import zlib
from pathlib import Path

import numpy as np

from ..errors import UserError
from .hf_source import HFSpec, SourceUnavailable, read_hf_source
from .source_base import (SOURCE_VAL, ArrayImages, FileImages, Source, SourceSplit, check_class_names, list_files,
                          read_class_names, read_source_bytes, read_source_text, require_file)

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


FULL_HASH_FILES = 32  # sources of at most this many files (pickles, IDX, lists) are hashed whole
SAMPLE_BYTES = 4096  # of larger sources (image trees), each file's size and its first, middle and last 4 KiB


def content_hash(paths):
    """Hash of the source files' contents, in order: the identity of the images whatever folder holds them. A
    rewritten source gets a new hash even when its size and modification time are kept (`cp -p`); a `touch` alone
    keeps it."""
    h = hashlib.sha256()
    whole = len(paths) <= FULL_HASH_FILES
    for p in paths:
        size = os.path.getsize(require_file(p, "source file"))
        h.update(f"{size}\n".encode())
        with open(p, "rb") as f:
            if whole or size <= 3 * SAMPLE_BYTES:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
                continue
            for offset in (0, size // 2, size - SAMPLE_BYTES):
                f.seek(offset)
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()[:16]


def fingerprint(paths, content, *extra):
    """What keys the cache: the source's content hash, its files' paths (the LTInfo records where it was read) and
    `extra`."""
    h = hashlib.sha256(repr((content, *extra)).encode())
    for p in paths:
        h.update(f"{os.path.abspath(p)}\n".encode())
    return h.hexdigest()[:16]


def require_dir(path, what):
    path = Path(path)
    if not path.is_dir():
        if path.is_symlink():
            raise UserError(f"{what} {path} is a symlink to {os.readlink(path)}, which does not exist; fix the link")
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
        if not (root / name).exists() and not (root / name).is_symlink():
            raise UserError(
                f"{root / name} not found; --data_dir must hold the extracted {layout['dir']}/ "
                f"(files {', '.join(names)}) of the original CIFAR-{num_classes} python archive"
            )
    return [require_file(root / n, "CIFAR file") for n in names]


def _unpickle(path, keys):
    """The dict of a CIFAR pickle holding `keys`."""
    data = read_source_bytes(path, "CIFAR file")
    try:
        d = pickle.loads(data, encoding="bytes")
    except Exception as err:  # a damaged pickle raises whatever the opcode it stops at raises
        raise UserError(f"{path} is not a CIFAR python pickle ({err.__class__.__name__}); re-extract the original "
                        "archive") from None
    missing = [k.decode() for k in keys if not isinstance(d, dict) or k not in d]
    if missing:
        raise UserError(f"{path} is not a CIFAR python pickle (no {missing[0]!r} entry); re-extract the original archive")
    return d


def _cifar_rows(d, path):
    data = d[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"{path}: 'data' must be uint8 rows of 3072 values (32x32 RGB), got "
                        f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}; re-extract "
                        "the original archive")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _int_labels(values, path, key):
    if not isinstance(values, (list, np.ndarray)) or not all(isinstance(v, (int, np.integer)) for v in values):
        raise UserError(f"{path}: {key!r} is not a list of integer labels; re-extract the original archive")
    return np.asarray(values, dtype=np.int64)


def _cifar_split(paths, label_key):
    images, labels = [], []
    for p in paths:
        d = _unpickle(p, (b"data", label_key))
        images.append(_cifar_rows(d, p))
        labels.append(_int_labels(d[label_key], p, label_key.decode()))
        if len(labels[-1]) != len(images[-1]):
            raise UserError(f"{p}: {len(labels[-1])} labels for {len(images[-1])} images; the file is damaged, "
                            "re-extract the original archive")
    origin = paths[0] if len(paths) == 1 else f"{paths[0].parent}/{{{','.join(p.name for p in paths)}}}"
    return SourceSplit(np.concatenate(labels), ArrayImages(np.concatenate(images)), str(origin))


def _cifar_names(path, key, num_classes):
    names = _unpickle(path, (key,))[key]
    try:
        if not isinstance(names, list) or not all(isinstance(n, bytes) for n in names):
            raise TypeError("not a list of byte strings")
        names = [n.decode("utf-8") for n in names]
    except (TypeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: the class names in {key.decode()!r} are not UTF-8 text ({err}); re-extract the "
                        "original archive") from None
    if len(names) != num_classes:
        raise UserError(f"{path} holds {len(names)} class names, CIFAR-{num_classes} has {num_classes}; re-extract "
                        "the original archive (or pass the other CIFAR --dataset)")
    check_class_names(names, path)
    return names


def read_cifar_local(data_dir, num_classes):
    layout = CIFAR_LAYOUT[num_classes]
    files = cifar_files(data_dir, num_classes)
    root = files[0].parent
    names = _cifar_names(root / layout["meta"], layout["names"], num_classes)
    splits = {split: _cifar_split([root / n for n in layout[split]], layout["labels"]) for split in ("train", "test")}
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


IDX_KINDS = {3: "images (N, H, W)", 1: "labels"}


def read_idx(path, ndim=None):
    """An IDX array (the MNIST file format): magic 0x0000 + dtype code 0x08 (uint8) + ndim, then big-endian dims.
    `ndim`: the dimensions required (3 for images, 1 for labels), None for any."""
    raw = read_source_bytes(path, "IDX file")
    if str(path).endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise UserError(f"{path} is not a whole gzip file ({err}); re-download the IDX file") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise UserError(f"{path} is not a uint8 IDX file (bad magic number or type code); re-download it")
    if ndim not in (None, raw[3]):
        raise UserError(f"{path} holds a {raw[3]}-D array, {IDX_KINDS[ndim]} are {ndim}-D; pass the right file or "
                        "re-download it")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise UserError(f"{path} ends inside its header; the file is truncated, re-download it")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    size = len(raw) - 4 - 4 * ndim
    if size != math.prod(dims):
        raise UserError(f"{path} holds {size} values, its header says {dims}; the file is truncated, re-download it")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def read_fashion_mnist(data_dir, cache_dir=None):
    if data_dir is None:
        return read_hub(*FASHION_MNIST_HUB, "folder with the IDX files (train-images-idx3-ubyte.gz, ...)",
                        cache_dir=cache_dir)
    root = Path(data_dir)
    splits = {}
    for split, (img_stem, lbl_stem) in IDX_STEMS.items():
        images = read_idx(_idx_path(root, img_stem), 3)
        labels = read_idx(_idx_path(root, lbl_stem), 1)
        splits[split] = SourceSplit(labels, ArrayImages(images), f"{root}/{{{img_stem},{lbl_stem}}}")
    return Source(list(FASHION_MNIST_CLASSES), splits, f"local:{root}")


# ---------------------------------------------------------------- OLTR txt lists


def parse_list(path):
    """`relative/path label` per line (OLTR format); blank lines skipped, an image listed twice refused."""
    rel, labels, seen = [], [], {}
    for lineno, line in enumerate(read_source_text(path, "list file").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not re.fullmatch(r"-?\d{1,18}", parts[1]):  # 18 digits: any int64
            raise UserError(f"{path}:{lineno}: expected 'relative/path label', got {line.strip()!r}; write one "
                            "'relative/path label' per line")
        if parts[0].strip() in seen:
            raise UserError(f"{path}:{lineno}: {parts[0].strip()} is listed twice (first on line "
                            f"{seen[parts[0].strip()]}); list each image once")
        seen[parts[0].strip()] = lineno
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
    """LIFT's iNat relabelling: class ids become the rank of the class name in sorted order (names checked unique)."""
    new_names = sorted(class_names)
    rank = {n: i for i, n in enumerate(new_names)}
    mapping = np.asarray([rank[n] for n in class_names], dtype=np.int64)
    return new_names, {k: (rel, mapping[labels]) for k, (rel, labels) in lists.items()}


def check_listed_files(root, rel_paths, list_path):
    for rel in rel_paths:
        if not (root / rel).is_file():
            raise UserError(f"{root / rel} (listed in {list_path}) does not exist; fix --data_dir or the list")


def listed_files(root, list_path):
    """The relative paths a list names, each checked to be a file under `root`."""
    rel, _ = parse_list(list_path)
    check_listed_files(Path(root), rel, list_path)
    return rel


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
        check_listed_files(root, rel, lists[s])

    def source(names, parsed):
        splits = {s: SourceSplit(labels, FileImages([root / r for r in rel], lists[s]), lists[s])
                  for s, (rel, labels) in parsed.items()}
        return Source(names, splits, f"local:{root}")

    checked = source(names, parsed)  # names and labels validated before they are relabelled
    return source(*relabel_by_sorted_name(names, parsed)) if relabel_by_name else checked


# ---------------------------------------------------------------- folder per class


def list_image_folder(root, class_names=None):
    """Sorted (paths, labels) of a folder-per-class tree; class names = sorted folder names unless given."""
    root, given = require_dir(root, "image folder"), class_names
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))  # .ipynb_checkpoints is no class
    for p in entries:
        if p.is_symlink() and not p.exists():
            raise UserError(f"{p} is a symlink to {os.readlink(p)}, which does not exist; fix or remove the link")
    folders = [p.name for p in entries if p.is_dir()]
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
        files = [p for p in list_files(folder, "image folder") if p.suffix.lower() in IMAGE_EXTENSIONS] \
            if folder.is_dir() else []
        if not files and given is None:
            raise UserError(f"class folder {folder} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                            "add images or remove the folder")
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
    splits = {"train": SourceSplit(labels, FileImages(paths, data_dir), str(data_dir))}
    for split, root in (("test", test_dir), (SOURCE_VAL, val_dir)):
        if root is not None:
            _, p, y = list_image_folder(root, names)
            splits[split] = SourceSplit(y, FileImages(p, root), str(root))
    return Source(names, splits, f"local:{Path(data_dir).resolve()}")
