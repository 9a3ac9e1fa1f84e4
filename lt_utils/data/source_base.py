"""What every source reader returns, and the one validation layer every reader passes through.

A reader returns a `Source`: class names plus, per source split, the labels in source order and an image reader that
yields encoded image bytes for a list of indices. sources.py (the built-in datasets' files) and hf_source.py (any
`datasets` source) both build on this module; sources.py also reads the built-ins' Hub copies through hf_source.py.

Validation is by construction: a `Source` cannot be built with class names that are not unique non-empty text, with
labels that are not 1-D integers inside the classes, or with a label count other than its image count. The readers
read files only through `read_source_bytes` / `read_source_text` (existing regular files, dangling symlinks named,
UTF-8 text), list folders through `list_files` (hidden entries skipped) and check images with `read_verified_image`
(decodable, within the pixel limit). Each refusal is one line naming the file and the fix.
"""
import dataclasses
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import PIL.Image

from ..errors import UserError


# PIL's own default: larger images are refused (a decompression bomb or not, one image this size fills memory)
MAX_IMAGE_PIXELS = 89_478_485


class ArrayImages:
    """Decoded uint8 images in memory (CIFAR, IDX); encoded to PNG as they are written."""

    def __init__(self, arrays):
        self.arrays = arrays

    def __len__(self):
        return len(self.arrays)

    def iter_bytes(self, indices):
        for i in indices:
            buf = io.BytesIO()
            PIL.Image.fromarray(self.arrays[i]).save(buf, format="PNG")
            yield buf.getvalue()


class FileImages:
    """Image files on disk; their original bytes are stored (no re-encoding), verified by PIL first."""

    def __init__(self, paths, origin):
        self.paths = paths
        self.origin = origin  # the list or folder they came from, for error messages

    def __len__(self):
        return len(self.paths)

    def iter_bytes(self, indices):
        for i in indices:
            yield read_verified_image(self.paths[i], self.origin)


class HubImages:
    """An image column of a Hub dataset, read without decoding."""

    def __init__(self, dataset, column):
        import datasets

        self.dataset = dataset.cast_column(column, datasets.Image(decode=False))
        self.column = column

    def __len__(self):
        return len(self.dataset)

    def iter_bytes(self, indices):
        for row in self.dataset.select(indices):
            image = row[self.column]
            yield image["bytes"] if image["bytes"] is not None else Path(image["path"]).read_bytes()


@dataclasses.dataclass
class SourceSplit:
    labels: np.ndarray  # int64, source order
    images: object  # ArrayImages | FileImages | HubImages
    origin: str = ""  # the file(s) the labels came from, for error messages

    def __post_init__(self):
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or not (labels.dtype.kind in "iu" or labels.size == 0):
            raise UserError(f"{self.origin}: the labels are not a list of integers (shape {labels.shape}, "
                            f"{labels.dtype}); re-extract or regenerate the source")
        if len(labels) != len(self.images):
            raise UserError(f"{self.origin}: {len(labels)} labels for {len(self.images)} images; the source is "
                            "truncated or mismatched, re-extract it")
        if len(labels) == 0:
            raise UserError(f"{self.origin} holds no images; re-extract the source or point to the right files")
        self.labels = labels.astype(np.int64)


# a source's own validation part (val list, --val_dir, --validation_split). The names of a source's parts are hashed
# into the LT split's index_hashes, so this one keeps its earlier name: a recorded split stays the same split
SOURCE_VAL = "val"


@dataclasses.dataclass
class Source:
    class_names: list
    splits: dict  # "train" / "test" / optionally SOURCE_VAL -> SourceSplit
    description: str

    def __post_init__(self):
        origin = next(iter(self.splits.values())).origin if self.splits else self.description
        check_class_names(self.class_names, origin)
        for split in self.splits.values():
            check_label_range(split.labels, len(self.class_names), split.origin)


def check_class_names(names, origin):
    """Class names must be non-empty text and unique: they name the head's rows, the prompts and the exports."""
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"{origin}: class name {i} ({name!r}) is not a non-empty text; fix the class names")
    seen = {}
    for i, name in enumerate(names):
        if name in seen:
            raise UserError(f"{origin}: class names {seen[name]} and {i} are both {name!r} (duplicate); give every "
                            "class its own name")
        seen[name] = i
    if len(names) < 2:
        raise UserError(f"{origin} has {len(names)} class; a classifier needs at least 2, add classes")


def check_label_range(labels, num_classes, origin):
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise UserError(
            f"{origin}: label {labels[bad[0]]} at entry {bad[0]} is outside 0..{num_classes - 1}; "
            "fix the labels or the class-names file"
        )


def require_file(path, what):
    """`path` as a Path if it is a regular file (or a symlink to one); a dangling symlink or a folder is named."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_symlink():
        raise UserError(f"{what} {path} is a symlink to {os.readlink(path)}, which does not exist; fix or remove the link")
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file; pass the file")
    raise UserError(f"{what} {path} not found; check the path")


def read_source_bytes(path, what):
    path = require_file(path, what)
    try:
        return path.read_bytes()
    except OSError as err:
        raise UserError(f"{what} {path} cannot be read ({err.strerror}); check its permissions") from None


def read_source_text(path, what):
    """A text file as UTF-8 (a byte-order mark is dropped, CRLF line ends are lines like LF)."""
    data = read_source_bytes(path, what)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(f"{what} {path} is not UTF-8 text (line {line}); save it as UTF-8") from None


def list_files(folder, what):
    """Every regular file under `folder`, sorted; hidden entries (".ipynb_checkpoints", ".DS_Store") are skipped,
    symlinked files and folders are followed (a folder reached twice is read once), a dangling symlink is refused."""
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink back up the tree: each folder is read once
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(dirpath) / name
            if name.startswith("."):
                continue
            if not path.exists():
                raise UserError(f"{path} (in {what} {folder}) is a symlink to {os.readlink(path)}, which does not "
                                "exist; fix or remove the link")
            out.append(path)
    return sorted(out)


def read_verified_image(path, origin):
    """The bytes of an image file, checked to decode's header and CRCs and to be within MAX_IMAGE_PIXELS."""
    data = read_source_bytes(path, f"image (from {origin})")
    try:
        with PIL.Image.open(io.BytesIO(data)) as im:
            pixels = im.size[0] * im.size[1]
            if pixels > MAX_IMAGE_PIXELS:
                raise UserError(f"{path} (from {origin}) is {im.size[0]}x{im.size[1]} = {pixels:,} pixels, over the "
                                f"{MAX_IMAGE_PIXELS:,} pixels of one image; resize the image or drop it")
            im.verify()
    except PIL.Image.DecompressionBombError as err:
        raise UserError(f"{path} (from {origin}) is over the pixel limit of one image ({err}); resize the image "
                        "or drop it") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{path} (from {origin}) is not a readable image ({err}); fix the file or drop it from the list")
    return data


def _clean_name(name):
    # Places365 categories look like "/a/airfield" or "/b/bus_station/indoor"
    return re.sub(r"^/[a-z]/", "", name.strip())


def read_class_names(path):
    """Class names in label order from a text or JSON file.

    Text: one class per line, in label order; "wnid name" (ImageNet classnames.txt) keeps the name,
    "name index" (Places365 categories) is placed at its index. JSON: a list of names, a {id: name}
    dict, or iNat's categories.json (a list of {"id", "name", ...}).
    """
    names = _parse_class_names(path, read_source_text(path, "class-names file"))
    check_class_names(names, f"class-names file {path}")
    return names


def _parse_class_names(path, text):
    if Path(path).suffix == ".json":
        try:
            data = json.loads(text)
            if isinstance(data, dict):
                return [data[k] for k in sorted(data, key=int)]
            if data and isinstance(data[0], dict):
                return [c["name"] for c in sorted(data, key=lambda c: int(c["id"]))]
            return [str(x) for x in data]
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"class-names file {path} is not a JSON list of names, {{id: name}} mapping or "
                            f"categories list ({err.__class__.__name__}); fix the file") from None
    by_index, plain = {}, []
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) >= 2 and re.fullmatch(r"\d+", parts[-1]):
            if int(parts[-1]) in by_index:
                raise UserError(f"class-names file {path}: index {parts[-1]} appears twice; give each index one line")
            by_index[int(parts[-1])] = _clean_name(" ".join(parts[:-1]))
        elif len(parts) >= 2 and re.fullmatch(r"n\d{8}", parts[0]):
            plain.append(" ".join(parts[1:]))
        else:
            plain.append(_clean_name(line))
    if by_index:
        missing = sorted(set(range(len(by_index))) - set(by_index))
        if missing or plain:
            raise UserError(f"class-names file {path}: "
                            + (f"index {missing[0]} is missing" if missing else "some lines have no index")
                            + "; give every class 0..N-1 one 'name index' line")
        return [by_index[i] for i in range(len(by_index))]
    if not plain:
        raise UserError(f"class-names file {path} holds no class names; write one name per line, in label order")
    return plain
