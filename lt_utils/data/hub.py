"""LT splits on the Hub: the files `build_lt.py --push_to_hub` uploads, and reading them back (`--dataset user/repo`).

The layout is the Hub's own for a parquet dataset, so `datasets.load_dataset("user/repo")` reads it without this
project: one parquet file per split under data/ (features, ClassLabel names included, in the parquet schema), a
dataset card whose YAML `configs` names the splits, and lt_info.json (counts, groups, how the split was drawn).
"""
import re
from pathlib import Path

import numpy as np

from ..axes import SPLITS
from ..errors import UserError, require
from ..fileio import atomic_dir
from ..hub_access import cache_if_unreachable
from .info import INFO_FILENAME, LTInfo, current_split_names, embed_info

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def is_hub_layout_dir(path):
    """A local folder in the pushed layout (a download or clone of a pushed repo), not a save_to_disk folder."""
    path = Path(path)
    return path.is_dir() and (path / INFO_FILENAME).is_file() and (path / "README.md").is_file() \
        and not (path / "dataset_dict.json").is_file()


def is_hub_dataset_id(name):
    return bool(HUB_ID.fullmatch(str(name))) and not Path(str(name)).exists()


def dataset_card(info, split_sizes):
    """README.md: the YAML `configs` that maps split names to files, then what the split is."""
    from huggingface_hub import DatasetCard, DatasetCardData

    data = DatasetCardData(
        configs=[{"config_name": "default",
                  "data_files": [{"split": s, "path": f"data/{s}-*.parquet"} for s in SPLITS]}],
        tags=["long-tail", "image-classification", "lt-hf"], task_categories=["image-classification"])
    groups = info.group_counts()
    body = "\n".join([
        f"# {info.dataset} (imbalance ratio {info.imb_text}, n_max {info.max_per_class})", "",
        f"Long-tailed split built by lt-hf's `build_lt.py` from {info.source}: {len(info.class_names)} classes, "
        f"train images per class from {max(info.train_counts)} to {min(info.train_counts)}; groups by training count: "
        f"many > {info.many_threshold} ({groups['many']} classes), medium ({groups['medium']}), "
        f"few < {info.few_threshold} ({groups['few']}). Splits: " + ", ".join(f"{s} {n:,}" for s, n in split_sizes.items()) + ".", "",
        "Per-class counts, groups and the selection parameters are in `lt_info.json`.", "",
        "```python", "from datasets import load_dataset", "ds = load_dataset(\"<this repo id>\")   # train / validation / test",
        "```", "",
        "With lt-hf: `python train_lt.py --dataset <this repo id> ...`.", ""])
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_hub_layout(ds, info, folder, overwrite=False):
    """Write the files of a pushed LT split into `folder` (atomically): data/<split>-00000-of-00001.parquet,
    README.md, lt_info.json."""
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        (Path(tmp) / "data").mkdir()
        for split in SPLITS:
            ds[split].to_parquet(str(Path(tmp) / "data" / f"{split}-00000-of-00001.parquet"))
        dataset_card(info, {s: ds[s].num_rows for s in SPLITS}).save(str(Path(tmp) / "README.md"))
        info.save(Path(tmp) / INFO_FILENAME)
    return Path(folder)


def push_lt_dataset(ds, info, repo_id, token=None):
    """Upload the layout above as a dataset repo (created if needed)."""
    import tempfile

    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_hub_layout(ds, info, Path(tmp) / "repo")
        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="dataset", exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(folder),
                          commit_message="Upload long-tailed split (lt-hf build_lt.py)")
    return repo_id


def load_lt_from_hub(source, cache_dir=None):
    """(DatasetDict, LTInfo) of a pushed LT split: a Hub dataset id or a local folder in the pushed layout, read with
    `datasets.load_dataset`; the counts, groups and class names of lt_info.json are checked against the data."""
    import datasets

    local, offline = Path(str(source)).is_dir(), None
    try:
        with cache_if_unreachable(source) as offline:  # the cache alone, at once, rather than a minute of retries
            # a repo pushed by an earlier version names its validation split "val"
            ds = current_split_names(datasets.load_dataset(str(source), cache_dir=cache_dir))
            if local:
                info_path = Path(str(source)) / INFO_FILENAME
            else:
                from huggingface_hub import hf_hub_download

                info_path = hf_hub_download(str(source), INFO_FILENAME, repo_type="dataset")
    except Exception as err:  # offline, missing repo, auth, not a dataset: all for the user to fix
        why = f"{offline}, and it is not in the cache" if offline else err.__class__.__name__
        raise UserError(f"could not load the dataset {source} ({why}); pass a builder name, a folder written by "
                        "build_lt.py, or a Hub dataset pushed with build_lt.py --push_to_hub") from None
    info = LTInfo.load(info_path)
    check_matches_info(ds, info, source)
    return embed_info(ds, info), info


def check_matches_info(ds, info, source):
    require(set(SPLITS) <= set(ds), f"{source} has splits {sorted(ds)}, not {', '.join(SPLITS)}; push it with build_lt.py")
    names = ds["train"].features["label"].names if hasattr(ds["train"].features["label"], "names") else None
    require(names == list(info.class_names),
            f"{source}: the class names of its label feature differ from {INFO_FILENAME}; push it again with build_lt.py")
    counts = np.bincount(np.asarray(ds["train"]["label"], dtype=np.int64), minlength=len(names)).tolist()
    require(counts == list(info.train_counts),
            f"{source}: its train split has per-class counts {counts[:5]}..., {INFO_FILENAME} says "
            f"{list(info.train_counts)[:5]}...; push it again with build_lt.py")


def check_no_config_name(config_name, source):
    if config_name is not None:
        raise UserError(f"--dataset_config_name {config_name} selects a builder preset; {source} is a built split "
                        "(it has none): drop --dataset_config_name")


def named_config_values(builder_cls, config_name, given, defaults):
    """The LTConfig fields a named builder config sets (e.g. fashion_mnist_lt's "quickstart": imb 100, n_max 600).
    A value the caller also set to something else is refused rather than silently losing to either side."""
    import dataclasses

    from .builders import LTConfig

    configs = {c.name: c for c in builder_cls.BUILDER_CONFIGS}
    require(config_name in configs, f"{builder_cls.DATASET} has no config {config_name!r}; choose one of "
                                    f"{', '.join(configs) or '(none)'} or drop --dataset_config_name")
    preset = configs[config_name]
    values = {}
    for field in dataclasses.fields(LTConfig):
        if field.name not in given:
            continue
        value = getattr(preset, field.name)
        # a named config sets the fields that differ from LTConfig's defaults, and always the ratio (imb100: 100)
        if value == field.default and not (field.name == "imb" and builder_cls.USES_IMB):
            continue
        require(given[field.name] in (defaults[field.name], value),
                f"config {config_name!r} sets {field.name}={value}, but {field.name}={given[field.name]} was also "
                "passed; drop one of them")
        values[field.name] = value
    return values
