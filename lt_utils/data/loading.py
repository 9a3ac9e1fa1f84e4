"""Entry points: build or load an LT split (`load_lt_dataset`), save / reload it with its LTInfo."""
import inspect
import os
import warnings
from pathlib import Path

import datasets

from ..axes import SPLITS, VAL_SOURCES
from ..errors import UserError
from ..fileio import atomic_dir, recorded_path
from . import sources
from .builders import BUILDERS, DatasetsLT, LTConfig
from .counts import SELECTION_MODES
from .hf_source import spec_fingerprint
from .hub import (check_no_config_name, is_hub_dataset_id, is_hub_layout_dir, load_lt_from_hub,
                  named_config_values)
from .info import INFO_FILENAME, LTInfo, current_split_names, embed_info

DATASET_NAMES = tuple(BUILDERS)


def builder_config_names():
    """Every builder's named configs (--dataset_config_name); which apply to a --dataset is checked when it loads."""
    return sorted({config.name for builder in BUILDERS.values() for config in builder.BUILDER_CONFIGS})
_ALIASES = {"imagenet": "imagenet_lt", "places": "places_lt", "inat": "inat2018", "inat2018_lt": "inat2018"}


def canonical_name(name):
    key = str(name).lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    key = key if key in BUILDERS else key + "_lt"
    if key not in BUILDERS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)} or a saved LT dir")
    return key


def is_saved_lt_dir(path):
    return os.path.isdir(str(path)) and os.path.isfile(os.path.join(str(path), INFO_FILENAME))


def _abs(path):
    return None if path is None else os.path.abspath(os.path.expanduser(str(path)))


def check_params(imb, max_per_class, val_per_class, val_source, selection, many_threshold, few_threshold):
    if imb is not None and imb < 1:
        raise UserError(f"imb={imb:g}: the imbalance ratio must be >= 1 (n_max / n_min); pass e.g. --imb 100")
    if max_per_class is not None and (int(max_per_class) != max_per_class or max_per_class < 1):
        raise UserError(f"max_per_class={max_per_class}: must be a positive integer (or unset for the source maximum)")
    if val_per_class < 0:
        raise UserError(f"val_per_class={val_per_class}: must be >= 0")
    if val_source not in VAL_SOURCES:
        raise UserError(f"val_source={val_source!r}: use one of {', '.join(VAL_SOURCES)}")
    if selection not in SELECTION_MODES:
        raise UserError(f"selection={selection!r}: use one of {', '.join(SELECTION_MODES)}")
    if few_threshold > many_threshold:
        raise UserError(f"few_threshold={few_threshold} exceeds many_threshold={many_threshold}; pick few <= many")


def load_lt_dataset(
    name, imb=100.0, data_dir=None, max_per_class=None, seed=0, selection="rng", val_per_class=20,
    val_source="unused_train", train_list=None, val_list=None, test_list=None, class_names_file=None,
    many_threshold=100, few_threshold=20, cache_dir=None, test_dir=None, val_dir=None, test_per_class=50,
    relabel_by_name=False, config_name=None, dataset_name=None, dataset_revision=None, train_split="train",
    validation_split=None, test_split=None, image_column_name="image", label_column_name="label",
    max_train_samples=None, trust_remote_code=False, train_val_split=None,
):
    """Build (or reuse from the `datasets` cache) an LT split; returns (DatasetDict train/validation/test, LTInfo).

    name: a builder (`DATASET_NAMES`, short forms like "cifar100" too), a directory written by `save_lt_to_disk`,
        or a split pushed by `build_lt.py --push_to_hub` (its Hub id, or a local folder in that layout); for the
        last two every other argument but `cache_dir` is ignored.
    config_name: a named builder config (e.g. fashion_mnist_lt's "quickstart": imb 100, n_max 600) whose values
        replace the defaults; an argument set to something else as well is refused.
    imb: ρ = n_max / n_min >= 1; class i keeps floor(n_max * ρ**(-i/(C-1))) images. None: every class keeps its
        source images (a source already long-tailed; `max_per_class` caps them). Unused by the list datasets.
    data_dir: local source (CIFAR python dir, IDX dir, image root of the lists, folder-per-class);
        None -> the Hub (fashion_mnist: Debian's IDX dir when installed, else the Hub).
    max_per_class: n_max; None -> the smallest class of the source train set (500 CIFAR-100, 5000 CIFAR-10,
        6000 Fashion-MNIST). For list datasets it caps each class instead.
    seed, selection: which images fill each class ("rng", "lift", "first"; see counts.class_order).
    val_per_class, val_source: validation = up to `val_per_class` unused source-train images per class
        ("unused_train"), or the first `val_per_class` test images per class, taken out of test ("test_slice").
        A val list / `val_dir` takes precedence. train_val_split: instead, a source without a validation split holds
        out this fraction of each class's train images as validation, before the LT rule.
    test_dir, val_dir, test_per_class: imagefolder_lt only (held-out test size per class without `test_dir`).
    relabel_by_name: list datasets; class ids = rank of the class name (LIFT's iNat order).
    dataset_name (builder "hf_lt", `name` may then be None): any `datasets` image-classification dataset, a Hub id or a
        local folder (save_to_disk, parquet / arrow shards, imagefolder); `config_name` is then its `datasets` config,
        `dataset_revision` its Hub revision. train_split / validation_split / test_split: its split names (validation
        None: unused train images per `val_source`; test None: its "test" split, else `test_per_class` held out).
        image_column_name / label_column_name: its columns (the label a ClassLabel, or ids / names with
        `class_names_file`). max_train_samples: a seeded (`seed`) random subset of its train split, before the LT rule.
    """
    passed = dict(locals())
    if dataset_name is not None or name == DatasetsLT.DATASET:
        check_hf_args(name, dataset_name, dict(data_dir=data_dir, train_list=train_list, val_list=val_list,
                                               test_list=test_list, test_dir=test_dir, val_dir=val_dir))
        key = DatasetsLT.DATASET
    elif is_saved_lt_dir(name) or is_hub_dataset_id(name):
        check_no_config_name(config_name, name)
        if is_hub_layout_dir(name) or is_hub_dataset_id(name):
            ds, info = load_lt_from_hub(name, cache_dir=_abs(cache_dir))
        else:
            ds, info = load_lt_from_disk(name)
        check_agrees_with_record(name, info, passed)
        return ds, info
    else:
        key = canonical_name(name)
    if key != DatasetsLT.DATASET:  # flags of a `datasets` source: refused rather than ignored
        hf_only = dict(dataset_revision=dataset_revision, validation_split=validation_split, test_split=test_split,
                       max_train_samples=max_train_samples,
                       train_split=None if train_split == "train" else train_split,
                       image_column_name=None if image_column_name == "image" else image_column_name,
                       label_column_name=None if label_column_name == "label" else label_column_name)
        for flag, value in hf_only.items():
            if value is not None:
                raise UserError(f"--{flag} applies to a --dataset_name source, not to --dataset {name}; drop it "
                                "or pass --dataset_name")
    builder_cls = BUILDERS[key]
    given = dict(imb=imb, max_per_class=max_per_class, seed=seed, selection=selection, val_per_class=val_per_class,
                 val_source=val_source, many_threshold=many_threshold, few_threshold=few_threshold,
                 test_per_class=test_per_class, train_val_split=train_val_split)
    hf = {}
    if key == DatasetsLT.DATASET:
        hf = dict(source_name=recorded_path(dataset_name), dataset_config_name=config_name,
                  dataset_revision=dataset_revision, train_split=train_split, validation_split=validation_split,
                  test_split=test_split, image_column_name=image_column_name, label_column_name=label_column_name,
                  max_train_samples=max_train_samples, trust_remote_code=bool(trust_remote_code))
    elif config_name is not None:
        defaults = {k: p.default for k, p in inspect.signature(load_lt_dataset).parameters.items()}
        given.update(named_config_values(builder_cls, config_name, given, defaults))
    imb, max_per_class = given["imb"], given["max_per_class"]
    check_params(imb, max_per_class, given["val_per_class"], given["val_source"], given["selection"],
                 given["many_threshold"], given["few_threshold"])
    if key == "fashion_mnist_lt" and data_dir is None:
        data_dir = sources.default_fashion_mnist_dir()
    params = dict(
        imb=(None if imb is None else float(imb)) if builder_cls.USES_IMB else 1.0, data_dir=_abs(data_dir), max_per_class=None if max_per_class is None else int(max_per_class),
        seed=int(given["seed"]), selection=given["selection"], val_per_class=int(given["val_per_class"]),
        val_source=given["val_source"], many_threshold=given["many_threshold"], few_threshold=given["few_threshold"],
        train_list=_abs(train_list), val_list=_abs(val_list), test_list=_abs(test_list),
        class_names_file=_abs(class_names_file), relabel_by_name=bool(relabel_by_name), test_dir=_abs(test_dir),
        val_dir=_abs(val_dir), test_per_class=int(given["test_per_class"]),
        train_val_split=given["train_val_split"],
    )
    params.update(hf)
    if hf:
        params["source_fingerprint"], _ = spec_fingerprint(DatasetsLT.spec(LTConfig(name="probe", **params)),
                                                           params["seed"], _abs(cache_dir))
        config_name = None  # the source's config, not a builder preset
    else:
        files = builder_cls.source_files(LTConfig(name="probe", **params))
        params["source_content"] = sources.content_hash(files)
        params["source_fingerprint"] = sources.fingerprint(files, params["source_content"], key, params["data_dir"])
    builder = builder_cls(cache_dir=_abs(cache_dir), name=config_name or builder_cls.config_name_for(imb), **params)
    try:
        builder.download_and_prepare()
    except datasets.exceptions.DatasetGenerationError as err:
        if isinstance(err.__cause__, UserError):
            raise err.__cause__ from None
        raise
    ds = datasets.DatasetDict({s: _as_split(builder, s) for s in SPLITS})
    if ds["validation"].num_rows == 0:
        warnings.warn(f"{key}: the validation split is empty; pass a val list, --val_dir, --train_val_split or "
                      "--val_source test_slice")
    return ds, LTInfo.from_dataset(ds["train"])


def check_agrees_with_record(name, info, passed):
    """A saved or pushed split fixes its own parameters: an argument set to something other than its default and
    other than what the split records is refused rather than silently ignored."""
    defaults = {k: p.default for k, p in inspect.signature(load_lt_dataset).parameters.items()}
    for key, value in passed.items():
        if key in ("name", "cache_dir", "config_name") or value == defaults[key]:
            continue
        # a recorded None is a value (--imb none: the source's own counts), not a parameter the split lacks
        recorded = getattr(info, key) if key in LT_RECORDED else _UNRECORDED
        if recorded is _UNRECORDED or value != recorded:
            shown = f" (it records {recorded})" if recorded is not _UNRECORDED else ""
            raise UserError(f"{key}={value} contradicts the saved split {name}{shown}, which fixes its images and "
                            "parameters; drop it, or build a new split with data_scripts/build_lt.py")


_UNRECORDED = object()
# the parameters a saved split records (LTInfo fields of the same name)
LT_RECORDED = ("imb", "max_per_class", "seed", "selection", "val_per_class", "val_source", "many_threshold",
               "few_threshold")


def check_hf_args(name, dataset_name, others):
    """--dataset_name selects hf_lt; flags of the other builders are refused rather than ignored."""
    if name not in (None, DatasetsLT.DATASET):
        raise UserError(f"--dataset {name} and --dataset_name {dataset_name} name two sources; pass one (--dataset_name "
                        "alone builds the LT split from that `datasets` source)")
    if dataset_name is None:
        raise UserError("hf_lt needs --dataset_name (a Hub dataset id or a local dataset folder)")
    for flag, value in others.items():
        if value is not None:
            raise UserError(f"--{flag} is not used with --dataset_name; drop it (the local folder itself is "
                            "--dataset_name, its splits are --train_split / --validation_split / --test_split)")


def _as_split(builder, split):
    # `datasets` writes no file for an empty split (a list dataset without a val list), so build it here
    if builder.info.splits[split].num_examples == 0:
        empty = {name: [] for name in builder.info.features}
        return datasets.Dataset.from_dict(empty, features=builder.info.features, info=builder.info.copy(), split=split)
    return builder.as_dataset(split=split)


def check_savable(ds, info):
    """A saved split must be loadable and usable: two classes or more, train and test images (`datasets` cannot load
    an empty split back, so an empty validation split is left out and rebuilt empty on load)."""
    if len(info.class_names) < 2:
        raise UserError(f"{info.dataset} has {len(info.class_names)} class; a classifier needs at least 2, add classes")
    for split in ("train", "test"):
        if ds[split].num_rows == 0:
            raise UserError(f"the {split} split of {info.dataset} is empty, so the saved dataset could not be used; "
                            "give each class more images (or a --test_dir / test list)")


def save_lt_to_disk(ds, info, path, overwrite=False):
    """Write `ds.save_to_disk` plus lt_info.json, atomically; the info is also embedded in `ds`."""
    check_savable(ds, info)
    kept = datasets.DatasetDict({name: split for name, split in embed_info(ds, info).items() if split.num_rows})
    with atomic_dir(path, overwrite=overwrite, nbytes=sum(split.data.nbytes for split in kept.values())) as tmp:
        kept.save_to_disk(str(tmp))
        info.save(Path(tmp) / INFO_FILENAME)
    return Path(path)


def load_lt_from_disk(path):
    path = Path(path)
    if not is_saved_lt_dir(path):
        raise UserError(f"{path} holds no {INFO_FILENAME}; pass a directory written by save_lt_to_disk / build_lt.py")
    info = LTInfo.load(path / INFO_FILENAME)
    try:
        ds = current_split_names(datasets.load_from_disk(str(path)))
    except Exception as err:  # missing or corrupted arrow / json files
        raise UserError(f"{path} is not a loadable saved dataset ({err.__class__.__name__}); build it again with "
                        "data_scripts/build_lt.py") from None
    if not isinstance(ds, datasets.DatasetDict) or "train" not in ds:
        raise UserError(f"{path} holds no train split; build it again with data_scripts/build_lt.py")
    for split in SPLITS:  # an empty split is not saved (datasets cannot load it): rebuild it empty
        if split not in ds:
            features = ds["train"].features
            ds[split] = datasets.Dataset.from_dict({name: [] for name in features}, features=features, split=split)
    return embed_info(ds, info), info
