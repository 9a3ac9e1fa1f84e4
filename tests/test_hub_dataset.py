"""Datasets round trip: what `build_lt.py --push_to_hub` uploads is read back by the real `datasets.load_dataset` and
by `--dataset user/repo` (load_lt_dataset) with its counts, groups and class names; named builder configs."""
import json
import shutil
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pytest

from helpers_hub import reachable_hub
from helpers_train import REPO
from lt_utils.data import load_lt_dataset, save_lt_to_disk
from lt_utils.data.counts import lt_counts
from lt_utils.errors import UserError

SPLIT = dict(imb=10, max_per_class=40, val_per_class=5)


class FakeHub:
    """huggingface_hub.HfApi stand-in (offline): a repo is a local folder, upload_folder copies into it."""

    def __init__(self, root):
        self.root = Path(root)

    def __call__(self, token=None):
        return self

    def create_repo(self, repo_id, repo_type=None, exist_ok=False, **_):
        assert repo_type == "dataset"
        return huggingface_hub.RepoUrl(f"https://huggingface.co/datasets/{repo_id}")

    def upload_folder(self, repo_id, repo_type, folder_path, commit_message=None):
        assert repo_type == "dataset"
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)


@pytest.fixture(scope="module")
def pushed(idx_dir, tmp_path_factory):
    """build_lt.py --push_to_hub you/fmnist-lt, into a local folder that stands for the Hub repo."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_lt", REPO / "data_scripts" / "build_lt.py")
    build_lt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_lt)

    root = tmp_path_factory.mktemp("hub")
    mp = pytest.MonkeyPatch()
    mp.setattr(huggingface_hub, "HfApi", FakeHub(root))
    mp.setattr(huggingface_hub, "create_repo", FakeHub(root).create_repo)
    try:
        with reachable_hub(mp, root):  # build_lt.py checks the Hub and creates the repo before building
                build_lt.main(["--dataset", "fashion_mnist", "--data_dir", str(idx_dir), "--imb", "10", "--max_per_class",
                           "40", "--val_per_class", "5", "--cache_dir", str(root / "cache"), "--push_to_hub",
                           "you/fmnist-lt"])
    finally:
        mp.undo()
    built = load_lt_dataset("fashion_mnist_lt", data_dir=idx_dir, cache_dir=root / "cache", **SPLIT)
    return root / "you" / "fmnist-lt", built


def test_pushed_layout_reads_with_plain_datasets(pushed):
    repo, (ds, info) = pushed
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()) == [
        "README.md", "data/test-00000-of-00001.parquet", "data/train-00000-of-00001.parquet",
        "data/validation-00000-of-00001.parquet", "lt_info.json"]
    plain = datasets.load_dataset(str(repo))  # the client a user has, reading the Hub's layout
    assert sorted(plain) == ["test", "train", "validation"]
    assert plain["train"].features["label"].names == info.class_names
    assert isinstance(plain["train"].features["image"], datasets.Image)
    for split in ("train", "validation", "test"):
        assert plain[split]["label"] == ds[split]["label"]
    counts = np.bincount(plain["train"]["label"], minlength=10).tolist()
    assert counts == info.train_counts == lt_counts(40, 10, 10)
    assert np.asarray(plain["train"][0]["image"]).tolist() == np.asarray(ds["train"][0]["image"]).tolist()
    card = (repo / "README.md").read_text()
    assert "path: data/validation-*.parquet" in card and "many > 100 (0 classes)" in card


def test_dataset_repo_reads_back_as_lt_split(pushed):
    repo, (ds, info) = pushed
    ds2, info2 = load_lt_dataset(str(repo))
    assert info2 == info
    assert info2.groups == info.groups and info2.class_names == info.class_names
    assert {s: ds2[s].num_rows for s in ds2} == {s: ds[s].num_rows for s in ds}
    assert ds2["test"]["label"] == ds["test"]["label"]


def test_a_repo_pushed_with_the_earlier_split_name_val_reads_as_validation(pushed, tmp_path):
    repo, (ds, info) = pushed
    legacy = tmp_path / "legacy"  # the layout as the previous version pushed it: the split, its file, its record "val"
    shutil.copytree(repo, legacy)
    (legacy / "data" / "validation-00000-of-00001.parquet").rename(legacy / "data" / "val-00000-of-00001.parquet")
    card = (legacy / "README.md").read_text()
    (legacy / "README.md").write_text(card.replace("split: validation", "split: val").replace("data/validation-", "data/val-"))
    record = json.loads((legacy / "lt_info.json").read_text())
    for key in ("split_sizes", "index_hashes"):
        record[key]["val"] = record[key].pop("validation")
    (legacy / "lt_info.json").write_text(json.dumps(record))
    assert sorted(datasets.load_dataset(str(legacy))) == ["test", "train", "val"]
    ds2, info2 = load_lt_dataset(str(legacy))
    assert info2 == info and list(ds2) == ["train", "validation", "test"]
    assert ds2["validation"]["label"] == ds["validation"]["label"] and ds2["validation"].num_rows == 50


def test_tampered_counts_are_refused(pushed, tmp_path):
    repo, (ds, info) = pushed
    copy = tmp_path / "copy"
    shutil.copytree(repo, copy)
    record = json.loads((copy / "lt_info.json").read_text())
    record["train_counts"][0] += 1
    (copy / "lt_info.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="its train split has per-class counts"):
        load_lt_dataset(str(copy))


@pytest.mark.slow  # the Hub client's retries wait ~20 s
def test_unreachable_hub_id_is_user_error():
    with pytest.raises(UserError, match="could not load the dataset nobody/no-such-lt-split"):
        load_lt_dataset("nobody/no-such-lt-split")


def test_named_builder_configs(idx_dir, tmp_path):
    ds, info = load_lt_dataset("fashion_mnist_lt", data_dir=idx_dir, cache_dir=tmp_path, config_name="imb50",
                               max_per_class=50, val_per_class=5)
    assert info.imb == 50 and info.train_counts == lt_counts(50, 50, 10) and info.train_counts[-1] == 1
    with pytest.raises(UserError, match=r"config 'imb50' sets imb=50.0, but imb=10 was also passed; drop one of them"):
        load_lt_dataset("fashion_mnist_lt", data_dir=idx_dir, cache_dir=tmp_path, config_name="imb50", imb=10)
    with pytest.raises(UserError, match="fashion_mnist_lt has no config 'nope'; choose one of imb100, imb50, imb10, "
                                        "quickstart"):
        load_lt_dataset("fashion_mnist_lt", data_dir=idx_dir, cache_dir=tmp_path, config_name="nope")
    save_lt_to_disk(ds, info, tmp_path / "saved")  # a built split has no presets: the name is refused, not ignored
    with pytest.raises(UserError, match="selects a builder preset; .* is a built split"):
        load_lt_dataset(str(tmp_path / "saved"), config_name="imb50")


def test_quickstart_config_on_real_fashion_mnist(tmp_path):
    """fashion_mnist_lt's "quickstart" preset: n_max 600, rho 100 on Debian's files (600 -> 6 images per class)."""
    ds, info = load_lt_dataset("fashion_mnist_lt", cache_dir=tmp_path, config_name="quickstart")
    assert info.max_per_class == 600 and info.train_counts == [600, 359, 215, 129, 77, 46, 27, 16, 10, 6]
