"""hf_lt: any `datasets` image-classification source made long-tailed (`--dataset_name`), from local folders in the
layouts `datasets` writes (save_to_disk arrow, parquet shards, imagefolder + metadata.csv) with non-default column
names (`img`, `fine_label`); a Hub id runs the same `datasets.load_dataset` call (a local folder stands in for it).

The source: 4 classes (apple, bear, cat, dog), 30 train / 5 test images each, 8 x 8 px, labels shuffled; every
image's pixels spell its index in its source split. ρ = 10 on n_max 30: floor(30 · 10^(−i/3)) = 30, 13, 6, 3
(52 images); groups with many > 20, few < 5: many, medium, medium, few.
"""
import json
import shutil
import sys

import datasets
import numpy as np
import pytest

from helpers_faults import cli_mains, reset_accelerate
from helpers_hf import (CLASS_NAMES, first_n, held_indices, source_labels, write_arrow, write_imagefolder,
                        write_parquet)
from helpers_train import REPO, TINY_VIT, assert_resumed_weights

sys.path.insert(0, str(REPO))
from lt_utils.data import load_lt_dataset, load_lt_from_disk  # noqa: E402
from lt_utils.data.hub import write_hub_layout  # noqa: E402

MAINS = cli_mains()
COUNTS = [30, 13, 6, 3]
GROUPS = ["many", "medium", "medium", "few"]
COMMON = dict(imb=10, many_threshold=20, few_threshold=5, val_per_class=4, selection="first", label_column_name="fine_label")
LAYOUTS = {  # writer, extra load_lt_dataset arguments (imagefolder always names its image column "image")
    "arrow": (write_arrow, dict(image_column_name="img")),
    "parquet": (write_parquet, dict(image_column_name="img")),
    "imagefolder": (write_imagefolder, dict(image_column_name="image", class_names_file="classes.txt")),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_sources")
    return {name: writer(root / name) for name, (writer, _) in LAYOUTS.items()}


def build(path, cache, **kw):
    extra = dict(LAYOUTS.get(path.name, LAYOUTS["parquet"])[1])
    if "class_names_file" in extra:
        extra["class_names_file"] = str(path / extra["class_names_file"])
    return load_lt_dataset(None, dataset_name=str(path), cache_dir=str(cache), **{**COMMON, **extra, **kw})


def expected_val(labels, counts, k):
    """`--selection first`: val = the next k unused images of each class, in source order."""
    labels = np.asarray(labels)
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[n:n + k] for c, n in enumerate(counts)]))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_give_the_lt_rule_split(sources, tmp_path, layout):
    ds, info = build(sources[layout], tmp_path / "cache")
    train_labels, test_labels = source_labels("train"), source_labels("test")
    assert info.dataset == "hf_lt" and info.class_names == CLASS_NAMES
    assert info.train_counts == COUNTS and info.groups == GROUPS and info.group_counts() == {"many": 1, "medium": 2, "few": 1}
    assert info.max_per_class == 30 and info.imb == 10
    assert {s: ds[s].num_rows for s in ds} == {"train": 52, "validation": 12, "test": 20}  # val: class 0 has no image left
    assert ds["train"].features["label"].names == CLASS_NAMES
    # exactly which source images: the first n_i of each class (train), the next 4 (val), the whole test split
    assert held_indices(ds["train"]) == first_n(train_labels, COUNTS).tolist()
    assert ds["train"]["label"] == train_labels[first_n(train_labels, COUNTS)].tolist()
    assert held_indices(ds["validation"]) == expected_val(train_labels, COUNTS, 4).tolist()
    assert held_indices(ds["test"]) == list(range(20)) and ds["test"]["label"] == test_labels.tolist()
    assert np.bincount(ds["test"]["label"]).tolist() == [5, 5, 5, 5]
    # the source is recorded, so eval_lt.py and a resume rebuild the same split
    hf = info.hf_source
    assert hf["dataset_name"] == str(sources[layout]) and hf["label_column_name"] == "fine_label"
    assert hf["image_column_name"] == LAYOUTS[layout][1]["image_column_name"] and set(hf["fingerprints"]) == {"train", "test"}
    assert info.source == f"datasets:{sources[layout]}"


def test_a_hub_id_runs_load_dataset_with_its_config_and_revision(sources, tmp_path, monkeypatch):
    """`--dataset_name user/repo` is `datasets.load_dataset("user/repo", config, revision=...)`; offline, a local
    parquet repo stands in for the Hub's answer."""
    calls = []
    real = datasets.load_dataset

    def load_dataset(name, config=None, **kw):
        calls.append((name, config, kw.get("revision"), kw.get("trust_remote_code")))
        return real(str(sources["parquet"]), cache_dir=kw.get("cache_dir"))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    ds, info = load_lt_dataset(None, dataset_name="someone/tiny-zoo", config_name="full", dataset_revision="v1.0",
                               trust_remote_code=True, image_column_name="img", cache_dir=str(tmp_path / "c"),
                               **{**COMMON, "selection": "rng"})
    assert calls and set(calls) == {("someone/tiny-zoo", "full", "v1.0", True)}
    assert info.train_counts == COUNTS and ds["train"].num_rows == 52 and ds["test"].num_rows == 20
    assert info.source == "datasets:someone/tiny-zoo (full)@v1.0"
    assert {k: info.hf_source[k] for k in ("dataset_name", "dataset_config_name", "dataset_revision")} == \
        {"dataset_name": "someone/tiny-zoo", "dataset_config_name": "full", "dataset_revision": "v1.0"}
    # rng selection: the same counts, each class's images a seeded draw (not the first ones for every class)
    got = np.asarray(held_indices(ds["train"]))
    assert np.bincount(source_labels("train")[got]).tolist() == COUNTS
    assert got.tolist() != first_n(source_labels("train"), COUNTS).tolist()


def test_validation_and_test_split_names(tmp_path):
    src = write_parquet(tmp_path / "three", splits=("train", "validation", "test"))
    ds, info = build(src, tmp_path / "c", validation_split="validation")
    assert {s: ds[s].num_rows for s in ds} == {"train": 52, "validation": 12, "test": 20}
    assert held_indices(ds["validation"]) == list(range(12)) and ds["validation"]["label"] == source_labels("validation").tolist()
    # the validation split named as the reported test split
    ds, _ = build(src, tmp_path / "c", test_split="validation")
    assert ds["test"].num_rows == 12 and ds["validation"].num_rows == 12  # val: unused train images again


def test_without_a_test_split_test_is_held_out_before_the_lt_rule(tmp_path):
    src = write_parquet(tmp_path / "trainonly", splits=("train",))
    ds, info = build(src, tmp_path / "c", test_per_class=5)
    # 5 per class held out (the last of each class), the LT rule on the other 25: floor(25 * 10^(-i/3)) = 25, 11, 5, 2
    assert info.train_counts == [25, 11, 5, 2] and info.max_per_class == 25
    labels = source_labels("train")
    held = np.sort(np.concatenate([np.flatnonzero(labels == c)[-5:] for c in range(4)]))
    assert held_indices(ds["test"]) == held.tolist()
    assert not set(held_indices(ds["test"])) & set(held_indices(ds["train"]) + held_indices(ds["validation"]))


def test_max_train_samples_is_a_seeded_subset_of_the_source_train_split_before_the_lt_rule(sources, tmp_path):
    ds, info = build(sources["parquet"], tmp_path / "c", max_train_samples=60, seed=3)
    kept = np.sort(np.random.default_rng(3).permutation(120)[:60])  # the HF example's shuffle + select, in source order
    labels = source_labels("train")[kept]
    n_max = int(np.bincount(labels).min())
    counts = [int(n_max * 0.1 ** (i / 3)) for i in range(4)]
    assert info.max_per_class == n_max and info.train_counts == counts == [12, 5, 2, 1]
    assert held_indices(ds["train"]) == kept[first_n(labels, counts)].tolist()
    assert held_indices(ds["validation"]) == kept[expected_val(labels, counts, 4)].tolist()  # val from the same subset
    assert ds["test"].num_rows == 20 and info.hf_source["max_train_samples"] == 60
    other, _ = build(sources["parquet"], tmp_path / "c", max_train_samples=60, seed=4)
    assert held_indices(other["train"]) != held_indices(ds["train"])  # another seed, another subset


def test_a_cached_rebuild_is_a_no_op_and_a_changed_source_is_rebuilt(tmp_path):
    src = write_parquet(tmp_path / "src")
    cache = tmp_path / "cache"
    _, first = build(src, cache)
    files = {p: p.stat().st_mtime_ns for p in cache.rglob("*.arrow")}
    _, again = build(src, cache)
    assert again == first  # same fingerprints and index hashes
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.arrow")} == files  # nothing written
    # the same file names with other contents: the first train image relabelled
    part = datasets.load_dataset("parquet", data_files=str(src / "data" / "train-00000-of-00002.parquet"),
                                 cache_dir=str(tmp_path / "pc"))["train"]
    labels = list(part["fine_label"])
    labels[0] = (labels[0] + 1) % 4
    part = part.remove_columns("fine_label").add_column("fine_label", labels).cast_column(
        "fine_label", datasets.ClassLabel(names=CLASS_NAMES))
    part.to_parquet(str(src / "data" / "train-00000-of-00002.parquet"))
    _, changed = build(src, cache)
    assert len(list(cache.rglob("*.arrow"))) > len(files)  # a new cache entry
    assert changed.hf_source["fingerprints"]["train"] != first.hf_source["fingerprints"]["train"]
    assert changed.index_hashes["train"] != first.index_hashes["train"]


def test_build_lt_cli_saves_and_pushes_the_layout(sources, tmp_path, capsys):
    out = tmp_path / "zoo_lt"
    MAINS["build"](["--dataset_name", str(sources["arrow"]), "--image_column_name", "img", "--label_column_name",
                    "fine_label", "--imb", "10", "--many_threshold", "20", "--few_threshold", "5", "--val_per_class", "4",
                    "--selection", "first", "--cache_dir", str(tmp_path / "c"), "--output_dir", str(out)])
    printed = capsys.readouterr().out
    assert "hf_lt from datasets:" in printed and "splits: train 52 | validation 12 | test 20" in printed
    assert "head 30 (apple), tail 3 (dog)" in printed
    saved = datasets.load_from_disk(str(out))
    assert saved["train"].num_rows == 52 and saved["train"].features["label"].names == CLASS_NAMES
    record = json.loads((out / "lt_info.json").read_text())
    assert record["train_counts"] == COUNTS and record["hf_source"]["image_column_name"] == "img"
    # the saved folder and the pushed (Hub parquet) layout load back with the same record
    ds, info = load_lt_from_disk(out)
    folder = write_hub_layout(ds, info, tmp_path / "pushed")
    again, info2 = load_lt_dataset(str(folder), cache_dir=str(tmp_path / "c2"))
    assert info2 == info and held_indices(again["train"]) == held_indices(ds["train"])


def hf_train_flags(source, out, *extra):
    return ["--dataset_name", str(source), "--image_column_name", "img", "--label_column_name", "fine_label",
            "--imb", "10", "--val_per_class", "4", "--model_name_or_path", str(TINY_VIT), "--from_scratch", "true",
            "--head_init", "random", "--method", "full_all", "--optimizer", "adamw", "--learning_rate", "0.001",
            "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "64", "--num_workers", "0",
            "--cache_dir", str(out.parent / "hf_cache"), "--output_dir", str(out), *map(str, extra)]


def test_resume_rebuilds_the_same_split_and_refuses_another(sources, tmp_path, capsys):
    """A run interrupted after step 1 (its step_1 state alone) resumes from the same flags to the weights of the
    uninterrupted run; the same flags with another subset of the source (other training images) are refused."""
    from safetensors.torch import load_file

    full, part = tmp_path / "full", tmp_path / "part"
    common = ("--max_train_steps", "2", "--checkpointing_steps", "1", "--eval_steps", "none")
    MAINS["train"](hf_train_flags(sources["arrow"], full, *common))
    part.mkdir()
    shutil.copytree(full / "step_1", part / "step_1")
    with pytest.raises(SystemExit) as exit_info:  # the recorded spec names the changed data flag
        MAINS["train"](hf_train_flags(sources["arrow"], part, *common, "--resume_from_checkpoint", "latest",
                                      "--max_train_samples", "100"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--max_train_samples" in err and "-> 100" in err
    with pytest.raises(SystemExit) as exit_info:  # allowed to change flags, the other training images still refuse it
        MAINS["train"](hf_train_flags(sources["arrow"], part, *common, "--resume_from_checkpoint", "latest",
                                      "--max_train_samples", "100", "--resume_allow_changes"))
    assert exit_info.value.code == 2 and "its train_images is" in capsys.readouterr().err
    assert sorted(p.name for p in part.iterdir()) == ["step_1"]
    MAINS["train"](hf_train_flags(sources["arrow"], part, *common, "--resume_from_checkpoint", "latest"))
    a, b = load_file(str(full / "final" / "model.safetensors")), load_file(str(part / "final" / "model.safetensors"))
    assert_resumed_weights(b, a)


def test_train_lt_on_a_dataset_name_exports_and_eval_lt_rebuilds_the_split(sources, tmp_path):
    """train_lt.py builds the split on the fly from --dataset_name; eval_lt.py re-evaluates the export from its
    config.json alone (no data flag passed) and gets the numbers train_lt.py recorded."""
    out = tmp_path / "run"
    flags = ["--dataset_name", str(sources["parquet"]), "--image_column_name", "img", "--label_column_name",
             "fine_label", "--imb", "10", "--val_per_class", "4", "--max_train_samples", "100",
             "--model_name_or_path", str(TINY_VIT), "--from_scratch", "true", "--head_init", "random", "--method", "full_all",
             "--optimizer", "adamw", "--learning_rate", "0.001", "--per_device_train_batch_size", "16",
             "--per_device_eval_batch_size", "64", "--num_workers", "0", "--max_train_steps", "3",
             "--cache_dir", str(tmp_path / "hf_cache"), "--output_dir", str(out)]
    reset_accelerate()
    results = MAINS["train"](flags)
    config = (out / "config.yaml").read_text()
    assert "dataset: hf_lt" in config and "image_column_name: img" in config and "max_train_samples: 100" in config
    info = json.loads((out / "final" / "config.json").read_text())["lt_info"]
    assert info["hf_source"]["dataset_name"] == str(sources["parquet"]) and info["hf_source"]["max_train_samples"] == 100
    reset_accelerate()
    evaluated = MAINS["eval"]([str(out / "final"), "--cache_dir", str(tmp_path / "hf_cache"), "--num_workers", "0",
                               "--per_device_eval_batch_size", "64", "--output_dir", str(tmp_path / "eval")])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["metrics"] == results["final"]["test"] == evaluated[str(out / "final")]
    assert metrics["config"]["split_hash"] == info["index_hashes"]["test"]
    assert metrics["config"]["dataset"]["dataset"] == "hf_lt"
    assert {k: metrics["config"]["dataset"]["hf_source"][k] for k in ("dataset_name", "image_column_name",
                                                                      "max_train_samples")} == \
        {"dataset_name": str(sources["parquet"]), "image_column_name": "img", "max_train_samples": 100}
