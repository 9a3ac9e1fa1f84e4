"""Each builder end to end on tiny data in the real on-disk formats; caching, saving, determinism across processes."""
import json
import pickle
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest

from helpers_data import (
    REPO, decoded_hashes, write_cifar10, write_cifar100, write_idx_dir, write_image_folder, write_oltr,
)
from lt_utils.data import DATASET_NAMES, LTInfo, load_lt_dataset, load_lt_from_disk, lt_counts, save_lt_to_disk
from lt_utils.data.sources import read_idx
from lt_utils.errors import UserError


@pytest.fixture(scope="module")
def cifar100_dir(tmp_path_factory):
    return write_cifar100(tmp_path_factory.mktemp("c100"), per_class_train=12, per_class_test=3)


def _cifar_train(root):
    d = pickle.loads((Path(root) / "cifar-100-python" / "train").read_bytes(), encoding="bytes")
    images = np.asarray(d[b"data"]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.asarray(d[b"fine_labels"])


def _pixels(split):
    return [np.asarray(row["image"]) for row in split]


def test_cifar100_first_selection_images_and_labels(cifar100_dir, tmp_path):
    ds, info = load_lt_dataset("cifar100", imb=4, data_dir=cifar100_dir, max_per_class=8, selection="first",
                               val_per_class=2, cache_dir=tmp_path)
    images, labels = _cifar_train(cifar100_dir)
    counts = lt_counts(8, 4, 100)
    assert info.train_counts == counts and info.class_names[3] == "fine03" and info.dataset == "cifar100_lt"
    assert ds["train"].features["label"].names == info.class_names
    assert set(ds["train"].features) == {"image", "label", "draw_rank"}
    # "first": the first n_i images of each class in source order; the split is written in source order
    expected = np.sort(np.concatenate([np.flatnonzero(labels == c)[:n] for c, n in enumerate(counts)]))
    assert ds["train"]["label"] == labels[expected].tolist()
    for got, i in zip(_pixels(ds["train"]), expected):
        np.testing.assert_array_equal(got, images[i])
    # val: the next unused images of each class (12 - n_i available, at most 2)
    val_expected = np.sort(np.concatenate([np.flatnonzero(labels == c)[n : n + 2] for c, n in enumerate(counts)]))
    assert ds["validation"]["label"] == labels[val_expected].tolist()
    assert ds["test"].num_rows == 300 and info.split_sizes == {"train": sum(counts), "validation": len(val_expected), "test": 300}


def test_cifar100_lift_selection_matches_legacy_draw(cifar100_dir, tmp_path):
    ds, info = load_lt_dataset("cifar100_lt", imb=4, data_dir=cifar100_dir, max_per_class=8, selection="lift",
                               cache_dir=tmp_path)
    images, labels = _cifar_train(cifar100_dir)
    np.random.seed(0)  # LIFT: global legacy seed, per-class shuffle in label order, keep the first n_i
    chosen = []
    for c, n in enumerate(lt_counts(8, 4, 100)):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        chosen.extend(idx[:n])
    got = {h for h in decoded_hashes(ds["train"])}
    want = {h for h in decoded_hashes(datasets.Dataset.from_dict(
        {"image": [images[i] for i in sorted(chosen)]}, features=datasets.Features({"image": datasets.Image()})))}
    assert got == want and info.selection == "lift"


def test_splits_are_disjoint_and_cached(cifar100_dir, tmp_path):
    kwargs = dict(imb=4, data_dir=cifar100_dir, max_per_class=8, val_per_class=3, cache_dir=tmp_path)
    ds, info = load_lt_dataset("cifar100", **kwargs)
    train, val, test = (set(decoded_hashes(ds[s])) for s in ("train", "validation", "test"))
    assert len(train) == ds["train"].num_rows and len(val) == ds["validation"].num_rows  # random images: all distinct
    assert not train & val and not train & test and not val & test
    arrow = sorted(tmp_path.rglob("*.arrow"))
    stamps = [p.stat().st_mtime_ns for p in arrow]
    ds2, info2 = load_lt_dataset("cifar100", **kwargs)  # cache hit: nothing rewritten
    assert sorted(tmp_path.rglob("*.arrow")) == arrow and [p.stat().st_mtime_ns for p in arrow] == stamps
    assert info2 == info and ds2["train"]["label"] == ds["train"]["label"]
    ds3, _ = load_lt_dataset("cifar100", **{**kwargs, "seed": 1})  # another config: another cache entry
    assert len(list(tmp_path.rglob("*.arrow"))) == 2 * len(arrow)
    assert decoded_hashes(ds3["train"]) != decoded_hashes(ds["train"])


def test_cifar100_test_slice(cifar100_dir, tmp_path):
    ds, info = load_lt_dataset("cifar100", imb=4, data_dir=cifar100_dir, max_per_class=8,
                               val_source="test_slice", val_per_class=1, cache_dir=tmp_path)
    assert ds["validation"].num_rows == 100 and ds["test"].num_rows == 200 and info.val_source == "test_slice"
    assert np.bincount(ds["validation"]["label"]).tolist() == [1] * 100
    assert not set(decoded_hashes(ds["validation"])) & set(decoded_hashes(ds["test"]))


def test_cifar10_batches(tmp_path):
    root = write_cifar10(tmp_path / "src", per_class_train=30, per_class_test=4)
    ds, info = load_lt_dataset("cifar10", imb=10, data_dir=root / "cifar-10-batches-py", selection="first",
                               cache_dir=tmp_path / "cache")
    labels, images = [], []
    for i in range(1, 6):  # torchvision's order: data_batch_1..5 concatenated
        d = pickle.loads((root / "cifar-10-batches-py" / f"data_batch_{i}").read_bytes(), encoding="bytes")
        labels.extend(d[b"labels"])
        images.append(np.asarray(d[b"data"]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    labels, images = np.asarray(labels), np.concatenate(images)
    counts = lt_counts(30, 10, 10)
    assert info.train_counts == counts and info.max_per_class == 30 and info.class_names[0] == "c10_0"
    expected = np.sort(np.concatenate([np.flatnonzero(labels == c)[:n] for c, n in enumerate(counts)]))
    for got, i in zip(_pixels(ds["train"]), expected):
        np.testing.assert_array_equal(got, images[i])
    assert ds["test"].num_rows == 40


def test_fashion_mnist_idx_raw(tmp_path):
    root = write_idx_dir(tmp_path / "idx", per_class_train=40, per_class_test=5, gz=False)
    ds, info = load_lt_dataset("fashion_mnist", imb=10, data_dir=root, val_per_class=5, cache_dir=tmp_path / "c")
    assert info.train_counts == lt_counts(40, 10, 10) and info.class_names[9] == "Ankle boot"
    assert np.bincount(ds["validation"]["label"], minlength=10).tolist() == [min(5, 40 - n) for n in info.train_counts]
    assert ds["test"].num_rows == 50
    source = read_idx(root / "train-images-idx3-ubyte")
    source_hashes = set(decoded_hashes(datasets.Dataset.from_dict(
        {"image": list(source)}, features=datasets.Features({"image": datasets.Image()}))))
    assert set(decoded_hashes(ds["train"])) <= source_hashes
    assert np.asarray(ds["train"][0]["image"]).shape == (28, 28)


def test_image_folder_carves_test_and_val(tmp_path):
    root = write_image_folder(tmp_path / "folder", per_class=[20, 16, 14, 12])
    ds, info = load_lt_dataset("imagefolder", imb=4, data_dir=root, test_per_class=3, val_per_class=2,
                               cache_dir=tmp_path / "c")
    # n_max defaults to the smallest class after holding out test: 12 - 3 = 9
    assert info.class_names == ["cls00", "cls01", "cls02", "cls03"] and info.max_per_class == 9
    assert info.train_counts == lt_counts(9, 4, 4)
    assert np.bincount(ds["test"]["label"]).tolist() == [3, 3, 3, 3]
    assert np.bincount(ds["validation"]["label"]).tolist() == [2, 2, 2, 2]
    hashes = [set(decoded_hashes(ds[s])) for s in ("train", "validation", "test")]
    assert not hashes[0] & hashes[1] and not hashes[0] & hashes[2] and not hashes[1] & hashes[2]
    with pytest.raises(UserError, match="needs 40"):
        load_lt_dataset("imagefolder", imb=4, data_dir=root, max_per_class=40, test_per_class=3,
                        cache_dir=tmp_path / "c")


def test_image_folder_with_test_and_val_dirs(tmp_path):
    root = write_image_folder(tmp_path / "train", per_class=[10, 10, 10])
    test = write_image_folder(tmp_path / "test", per_class=[2, 2, 2], seed=1)
    val = write_image_folder(tmp_path / "val", per_class=[1, 1, 1], seed=2)
    ds, info = load_lt_dataset("imagefolder_lt", imb=5, data_dir=root, test_dir=test, val_dir=val,
                               cache_dir=tmp_path / "c")
    assert info.train_counts == [10, 4, 2]
    assert ds["test"]["label"] == [0, 0, 1, 1, 2, 2] and ds["validation"]["label"] == [0, 1, 2]


def test_imagenet_lt_lists_and_class_names(tmp_path):
    root = tmp_path / "imagenet"
    train = write_oltr(root, [6, 3, 1], prefix="train")
    val = write_oltr(root, [1, 1, 1], prefix="val", seed=1)
    test = write_oltr(root, [2, 2, 2], prefix="test", seed=2)
    names = tmp_path / "classnames.txt"
    names.write_text("n01440764 tench\nn01443537 goldfish\nn01484850 great white shark\n")
    ds, info = load_lt_dataset("imagenet_lt", data_dir=root, train_list=train, val_list=val, test_list=test,
                               class_names_file=names, cache_dir=tmp_path / "c")
    assert info.class_names == ["tench", "goldfish", "great white shark"]
    assert info.train_counts == [6, 3, 1] and info.imb == 6.0
    assert [ds[s].num_rows for s in ("train", "validation", "test")] == [10, 3, 6]
    # the stored bytes are the listed files' own bytes, with the listed label
    rows = [line.split() for line in train.read_text().splitlines()]
    stored = ds["train"].cast_column("image", datasets.Image(decode=False))
    by_bytes = {row["image"]["bytes"]: row["label"] for row in stored}
    assert {(root / p).read_bytes(): int(y) for p, y in rows} == by_bytes
    arrow = sorted((tmp_path / "c").rglob("*.arrow"))
    load_lt_dataset("imagenet_lt", imb=50, data_dir=root, train_list=train, val_list=val, test_list=test,
                    class_names_file=names, cache_dir=tmp_path / "c")
    assert sorted((tmp_path / "c").rglob("*.arrow")) == arrow  # imb does not apply to lists: same cache entry
    capped, cinfo = load_lt_dataset("imagenet_lt", data_dir=root, train_list=train, test_list=test,
                                    max_per_class=2, val_per_class=5, cache_dir=tmp_path / "c")
    # without a val list, val = the train-list images the cap left unused
    assert cinfo.train_counts == [2, 2, 1] and capped["validation"]["label"] == [0] * 4 + [1]


def test_places_lt_names_from_categories_and_from_paths(tmp_path):
    root = tmp_path / "places"
    train, test = write_oltr(root, [4, 2], prefix="train"), write_oltr(root, [1, 1], prefix="test", seed=1)
    val = write_oltr(root, [1, 1], prefix="val", seed=2)
    cats = tmp_path / "categories_places365.txt"
    cats.write_text("/b/bus_station/indoor 1\n/a/airfield 0\n")
    _, info = load_lt_dataset("places", data_dir=root, train_list=train, val_list=val, test_list=test,
                              class_names_file=cats, cache_dir=tmp_path / "c")
    assert info.class_names == ["airfield", "bus_station/indoor"]
    with pytest.warns(UserWarning, match="validation split is empty"):
        ds, info = load_lt_dataset("places_lt", data_dir=root, train_list=train, test_list=test,
                                   cache_dir=tmp_path / "c2")
    assert info.class_names == ["cls_0", "cls_1"] and ds["validation"].num_rows == 0


def test_inat_relabel_by_name(tmp_path):
    root = tmp_path / "inat"
    train, test = write_oltr(root, [3, 2, 1], prefix="train"), write_oltr(root, [2, 2, 2], prefix="test", seed=1)
    cats = tmp_path / "categories.json"
    cats.write_text(json.dumps([{"id": 0, "name": "Zebra"}, {"id": 2, "name": "Mole"}, {"id": 1, "name": "Ant"}]))
    common = dict(data_dir=root, train_list=train, test_list=test, class_names_file=cats, cache_dir=tmp_path / "c",
                  val_source="test_slice", val_per_class=1)
    _, raw = load_lt_dataset("inat2018", **common)
    assert raw.class_names == ["Zebra", "Ant", "Mole"] and raw.train_counts == [3, 2, 1]
    ds, lift = load_lt_dataset("inat2018", relabel_by_name=True, **common)
    assert lift.class_names == ["Ant", "Mole", "Zebra"] and lift.train_counts == [2, 1, 3]
    assert ds["test"].features["label"].names == ["Ant", "Mole", "Zebra"]
    # test_slice: the first test image of each class moves to val
    assert sorted(ds["validation"]["label"]) == [0, 1, 2] and sorted(ds["test"]["label"]) == [0, 1, 2]


def test_save_and_load_round_trip(cifar100_dir, tmp_path):
    ds, info = load_lt_dataset("cifar100", imb=4, data_dir=cifar100_dir, max_per_class=8, cache_dir=tmp_path / "c")
    info = info.with_thresholds(6, 3)
    out = tmp_path / "saved"
    save_lt_to_disk(ds, info, out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp dir left
    for loaded, linfo in (load_lt_from_disk(out), load_lt_dataset(str(out))):
        assert linfo == info and linfo.many_threshold == 6
        assert loaded["train"]["label"] == ds["train"]["label"]
    assert LTInfo.from_dataset(datasets.load_from_disk(str(out))["validation"]) == info  # one call, plain datasets
    with pytest.raises(UserError, match="already exists"):
        save_lt_to_disk(ds, info, out)
    save_lt_to_disk(ds, info.with_thresholds(100, 20), out, overwrite=True)
    assert load_lt_from_disk(out)[1].many_threshold == 100
    with pytest.raises(UserError, match="lt_info.json"):
        load_lt_from_disk(tmp_path)


def test_dataset_names():
    assert set(DATASET_NAMES) == {"cifar100_lt", "cifar10_lt", "fashion_mnist_lt", "imagenet_lt", "places_lt",
                                  "inat2018", "imagefolder_lt", "hf_lt"}
    with pytest.raises(UserError, match="unknown dataset 'mnist'"):
        load_lt_dataset("mnist")


_DIGEST = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
from helpers_data import split_digest
from lt_utils.data import load_lt_dataset
ds, info = load_lt_dataset("cifar100", imb=4, data_dir={src!r}, max_per_class=8, seed={seed}, cache_dir=sys.argv[1])
print(split_digest(ds), info.index_hashes["train"])
"""


@pytest.mark.slow  # two fresh interpreters
def test_determinism_across_processes(cifar100_dir, tmp_path):
    """Two interpreters, two caches: the same images and labels in the same order (seeds differ: see above)."""
    code = _DIGEST.format(repo=str(REPO), tests=str(REPO / "tests"), src=str(cifar100_dir), seed=0)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / cache)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for cache in ("a", "b")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    first, second = (out.split() for out, _ in outs)
    assert first == second and len(first[0]) == 64


def test_hub_source_path_on_a_local_parquet_repo(tmp_path, monkeypatch):
    """The Hub route (`datasets.load_dataset(repo)`) run for real on a local repo laid out like uoft-cs/cifar100."""
    from lt_utils.data import sources

    rng = np.random.default_rng(0)
    feats = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["x", "y", "z"]),
                               "coarse_label": datasets.ClassLabel(names=["u"])})
    repo = tmp_path / "repo"
    for split, per_class in (("train", 6), ("test", 2)):
        labels = rng.permutation(np.repeat(np.arange(3), per_class))
        images = list(rng.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8))
        part = datasets.Dataset.from_dict({"img": images, "fine_label": labels, "coarse_label": [0] * len(labels)},
                                          features=feats)
        part.to_parquet(str(repo / "data" / f"{split}-00000-of-00001.parquet"))
    monkeypatch.setitem(sources.CIFAR_HUB, 100, (str(repo), "img", "fine_label"))
    ds, info = load_lt_dataset("cifar100", imb=3, selection="first", val_per_class=1, cache_dir=tmp_path / "c")
    assert info.class_names == ["x", "y", "z"] and info.train_counts == [6, 3, 2]
    assert info.source == f"hub:{repo}"
    source = datasets.load_dataset(str(repo), cache_dir=str(tmp_path / "c2"))["train"]
    labels = np.asarray(source["fine_label"])
    expected = np.sort(np.concatenate([np.flatnonzero(labels == c)[:n] for c, n in enumerate([6, 3, 2])]))
    for got, i in zip(_pixels(ds["train"]), expected):
        np.testing.assert_array_equal(got, np.asarray(source[int(i)]["img"]))
    # val: the next unused image of the classes that have one (y and z), in source order
    val_expected = np.sort([np.flatnonzero(labels == c)[n] for c, n in ((1, 3), (2, 2))])
    assert ds["validation"]["label"] == labels[val_expected].tolist() and ds["test"].num_rows == 6
