"""What every source reader returns, and the checks the readers share.

A reader returns a `Source`: class names plus, per source split, the labels in source order and an image reader that
yields encoded image bytes for a list of indices. sources.py (the built-in datasets' files) and hf_source.py (any
`datasets` source) both build on this module; sources.py also reads the built-ins' Hub copies through hf_source.py.
"""
import dataclasses
import io
import json
import re
from pathlib import Path

import numpy as np
import PIL.Image

from ..errors import UserError


class ArrayImages:
    """Decoded uint8 images in memory (CIFAR, IDX); encoded to PNG as they are written."""

    def __init__(self, arrays):
        self.arrays = arrays

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

    def iter_bytes(self, indices):
        for i in indices:
            yield read_verified_image(self.paths[i], self.origin)


class HubImages:
    """An image column of a Hub dataset, read without decoding."""

    def __init__(self, dataset, column):
        import datasets

        self.dataset = dataset.cast_column(column, datasets.Image(decode=False))
        self.column = column

    def iter_bytes(self, indices):
        for row in self.dataset.select(indices):
            image = row[self.column]
            yield image["bytes"] if image["bytes"] is not None else Path(image["path"]).read_bytes()


@dataclasses.dataclass
class SourceSplit:
    labels: np.ndarray  # int64, source order
    images: object  # ArrayImages | FileImages | HubImages


@dataclasses.dataclass
class Source:
    class_names: list
    splits: dict  # "train" / "test" / optionally "val" -> SourceSplit
    description: str


def read_verified_image(path, origin):
    try:
        data = Path(path).read_bytes()
        with PIL.Image.open(io.BytesIO(data)) as im:
            im.verify()
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{path} (from {origin}) is not a readable image ({err}); fix the file or drop it from the list")
    return data


def require_file(path, what):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found; check the path")
    return path


def check_label_range(labels, num_classes, origin):
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise UserError(
            f"{origin}: label {labels[bad[0]]} at entry {bad[0]} is outside 0..{num_classes - 1}; "
            "fix the labels or the class-names file"
        )


def _clean_name(name):
    # Places365 categories look like "/a/airfield" or "/b/bus_station/indoor"
    return re.sub(r"^/[a-z]/", "", name.strip())


def read_class_names(path):
    """Class names in label order from a text or JSON file.

    Text: one class per line, in label order; "wnid name" (ImageNet classnames.txt) keeps the name,
    "name index" (Places365 categories) is placed at its index. JSON: a list of names, a {id: name}
    dict, or iNat's categories.json (a list of {"id", "name", ...}).
    """
    path = require_file(path, "class-names file")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            return [data[k] for k in sorted(data, key=int)]
        if data and isinstance(data[0], dict):
            return [c["name"] for c in sorted(data, key=lambda c: int(c["id"]))]
        return [str(x) for x in data]
    by_index, plain = {}, []
    for line in path.read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) >= 2 and re.fullmatch(r"\d+", parts[-1]):
            by_index[int(parts[-1])] = _clean_name(" ".join(parts[:-1]))
        elif len(parts) >= 2 and re.fullmatch(r"n\d{8}", parts[0]):
            plain.append(" ".join(parts[1:]))
        else:
            plain.append(_clean_name(line))
    if by_index:
        return [by_index[i] for i in sorted(by_index)]
    return plain
