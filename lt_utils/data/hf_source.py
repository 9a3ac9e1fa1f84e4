"""Any `datasets` image-classification dataset as an LT source: a Hub id (`datasets.load_dataset`), a local
`save_to_disk` folder (`datasets.load_from_disk`), or a local folder `load_dataset` reads (parquet / arrow shards,
`imagefolder` with metadata.csv).

`HFSpec` is what names the source (the HF example's flags); `open_splits` loads it and checks the splits and
columns; `read_hf_source` turns it into a `Source` (class names, labels, images read without decoding). Nothing here
decides the LT split.
"""
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..hub_access import cache_if_unreachable
from .source_base import SOURCE_VAL, HubImages, Source, SourceSplit, read_class_names


@dataclasses.dataclass(frozen=True)
class HFSpec:
    """The flags that name a `datasets` source; recorded in LTInfo.hf_source so eval / resume rebuild the same split."""

    dataset_name: str
    dataset_config_name: str = None
    dataset_revision: str = None
    train_split: str = "train"
    validation_split: str = None  # None: val from the LT draw's unused train images (the project's honest val)
    test_split: str = None  # None: the source's "test" split if it has one, else held out from train
    image_column_name: str = "image"
    label_column_name: str = "label"
    class_names_file: str = None
    max_train_samples: int = None
    trust_remote_code: bool = False

    def splits(self, available):
        """{"train"/SOURCE_VAL/"test": source split name} for the splits the source provides (test may be absent: held out)."""
        test = self.test_split or ("test" if "test" in available else None)
        wanted = {"train": self.train_split, SOURCE_VAL: self.validation_split, "test": test}
        named = {role: name for role, name in wanted.items() if name is not None}
        flags = {"train": "--train_split", SOURCE_VAL: "--validation_split", "test": "--test_split"}
        for role, name in named.items():
            if name not in available:
                raise UserError(f"{flags[role]} {name}: {self.dataset_name} has no split {name!r}; its splits are "
                                f"{', '.join(sorted(available))}")
        if len(set(named.values())) < len(named):
            raise UserError(f"the same source split serves two roles ({', '.join(f'{flags[r]} {n}' for r, n in named.items())}); "
                            "give train, validation and test different splits")
        return named


def is_saved_to_disk(path):
    path = Path(path)
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def load_source(spec, cache_dir=None):
    """The source as a DatasetDict: `load_from_disk` for a save_to_disk folder, else `load_dataset` (Hub id or a local
    folder of parquet / arrow shards or an imagefolder)."""
    import datasets

    name = spec.dataset_name
    if is_saved_to_disk(name):
        if spec.dataset_config_name or spec.dataset_revision:
            raise UserError(f"{name} is a save_to_disk folder, which has no configs or revisions; drop "
                            "--dataset_config_name / --dataset_revision")
        try:
            dd = datasets.load_from_disk(str(name))
        except Exception as err:  # corrupted or partial arrow files
            raise UserError(f"{name} is not a loadable save_to_disk folder ({err.__class__.__name__}); save it again") from None
        return dd if isinstance(dd, datasets.DatasetDict) else datasets.DatasetDict({"train": dd})
    offline = None
    try:
        # trust_remote_code only when asked: datasets >= 4 runs no loading scripts and logs an error for the flag
        remote = {"trust_remote_code": True} if spec.trust_remote_code else {}
        with cache_if_unreachable(name) as offline:  # datasets' own requests would retry for a minute
            return datasets.load_dataset(str(name), spec.dataset_config_name, revision=spec.dataset_revision,
                                         cache_dir=cache_dir, **remote)
    except Exception as err:  # offline, unknown repo or config, auth, not a dataset: for the user to fix
        detail = (f"{offline}, and it is not in the cache" if offline else
                  f"{err.__class__.__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}")
        raise SourceUnavailable(f"could not load --dataset_name {name} ({detail}); pass a Hub dataset id (online), a "
                                "save_to_disk folder, or a folder of parquet files or images", detail) from None


class SourceUnavailable(UserError):
    """load_dataset failed; `detail` says why, for callers that name the source in their own words."""

    def __init__(self, message, detail):
        super().__init__(message)
        self.detail = detail


def _check_columns(split, spec, name):
    import datasets

    features = split.features
    for flag, column in (("--image_column_name", spec.image_column_name), ("--label_column_name", spec.label_column_name)):
        if column not in features:
            raise UserError(f"{flag} {column}: split {name} of {spec.dataset_name} has no column {column!r}; its columns "
                            f"are {', '.join(features)}")
    if not isinstance(features[spec.image_column_name], datasets.Image):
        raise UserError(f"--image_column_name {spec.image_column_name}: that column holds {_kind(features[spec.image_column_name])}, "
                        "not images; name the column of type Image")


def _kind(feature):
    return getattr(feature, "dtype", None) or type(feature).__name__


def class_names_of(split, spec):
    """From the label column's ClassLabel, else from --class_names_file."""
    import datasets

    feature = split.features[spec.label_column_name]
    if spec.class_names_file is not None:
        return read_class_names(spec.class_names_file)
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    raise UserError(f"--label_column_name {spec.label_column_name}: that column holds {_kind(feature)}, not a ClassLabel, "
                    "so it names no classes; pass --class_names_file (class names in label order, or the label strings)")


def label_ids(split, spec, names, origin):
    """Labels in source order: ClassLabel / int ids (checked against the classes by Source), or strings mapped by name."""
    values = split[spec.label_column_name]
    if values and isinstance(values[0], str):
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted({v for v in values if v not in index})
        if unknown:
            raise UserError(f"{origin}: label {unknown[0]!r} is not in --class_names_file {spec.class_names_file}; "
                            "add it to the file")
        return np.asarray([index[v] for v in values], dtype=np.int64)
    return np.asarray(values)  # checked against the classes by SourceSplit / Source


def truncated_train(n, max_train_samples, seed):
    """--max_train_samples: a seeded random subset of the source train split (the HF example's shuffle + select),
    kept in source order so the LT draw then works as on the full split."""
    if max_train_samples is None or max_train_samples >= n:
        return None
    return np.sort(np.random.default_rng(seed).permutation(n)[:max_train_samples])


def read_hf_source(spec, seed=0, cache_dir=None):
    """(Source, {role: fingerprint}) of a `datasets` source."""
    dd = load_source(spec, cache_dir)
    roles = spec.splits(list(dd))
    names = None
    splits, fingerprints = {}, {}
    for role, split_name in roles.items():
        part = dd[split_name]
        _check_columns(part, spec, split_name)
        names = names if names is not None else class_names_of(part, spec)
        fingerprints[role] = part._fingerprint
        if role == "train":
            keep = truncated_train(len(part), spec.max_train_samples, seed)
            if keep is not None:
                part = part.select(keep)
                fingerprints[role] = f"{part._fingerprint}"
        origin = f"{spec.dataset_name} split {split_name} column {spec.label_column_name}"
        labels = label_ids(part, spec, names, origin)
        splits[role] = SourceSplit(labels, HubImages(part.select_columns([spec.image_column_name]),
                                                     spec.image_column_name), origin)
    config = f" ({spec.dataset_config_name})" if spec.dataset_config_name else ""
    revision = f"@{spec.dataset_revision}" if spec.dataset_revision else ""
    return Source(list(names), splits, f"datasets:{spec.dataset_name}{config}{revision}"), fingerprints


def spec_fingerprint(spec, seed=0, cache_dir=None):
    """What keys the cache: the flags plus the `datasets` fingerprints of the splits used (stable across cache dirs;
    a changed local folder or Hub revision gets a new one)."""
    _, fingerprints = read_hf_source(spec, seed, cache_dir)
    record = {**dataclasses.asdict(spec), "fingerprints": fingerprints}
    if spec.class_names_file:
        record["class_names"] = read_class_names(spec.class_names_file)
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16], fingerprints
