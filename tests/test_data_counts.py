"""LT count rule, groups, per-class image choice, CIFAR-100-LT split plan at full size, capped subsets, LTInfo."""
import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Value

from lt_utils.data import LTInfo, assign_groups, capped_subset, lt_counts
from lt_utils.data.builders import Cifar100LT
from lt_utils.data.counts import class_order, group_of_count
from lt_utils.data.sources import ArrayImages, Source, SourceSplit
from lt_utils.errors import UserError

# the CIFAR-100-LT (rho 100) train counts every LT paper uses, written out: head to tail
CIFAR100_R100 = [
    500, 477, 455, 434, 415, 396, 378, 361, 344, 328, 314, 299, 286, 273, 260, 248, 237, 226, 216, 206, 197, 188,
    179, 171, 163, 156, 149, 142, 135, 129, 123, 118, 112, 107, 102, 98, 93, 89, 85, 81, 77, 74, 70, 67, 64, 61, 58,
    56, 53, 51, 48, 46, 44, 42, 40, 38, 36, 35, 33, 32, 30, 29, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15,
    15, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5,
]


@pytest.mark.parametrize(
    "imb,total,groups", [(10, 19573, (69, 31, 0)), (50, 12608, (41, 41, 18)), (100, 10847, (35, 35, 30))]
)
def test_cifar100_counts_and_groups(imb, total, groups):
    counts = lt_counts(500, imb, 100)
    assert sum(counts) == total
    assert counts[0] == 500 and counts[-1] == 500 // imb
    g = assign_groups(counts)
    assert (g.count("many"), g.count("medium"), g.count("few")) == groups
    if imb == 100:
        assert counts == CIFAR100_R100
        assert g == ["many"] * 35 + ["medium"] * 35 + ["few"] * 30


def test_fashion_mnist_quickstart_counts():
    assert lt_counts(600, 100, 10) == [600, 359, 215, 129, 77, 46, 27, 16, 10, 6]
    assert lt_counts(7, 1, 4) == [7, 7, 7, 7]
    assert lt_counts(9, 100, 1) == [9]


def test_imb_below_one_is_a_user_error():
    with pytest.raises(UserError, match="imb=0.5"):
        lt_counts(500, 0.5, 100)


def test_group_boundaries_and_thresholds():
    assert [group_of_count(n) for n in (101, 100, 20, 19)] == ["many", "medium", "medium", "few"]
    assert [group_of_count(n, 50, 10) for n in (51, 50, 10, 9)] == ["many", "medium", "medium", "few"]
    with pytest.raises(UserError, match="few_threshold=30"):
        assign_groups([5], many_threshold=20, few_threshold=30)


def _labels(num_classes, per_class, seed=3):
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def test_lift_selection_equals_legacy_global_seed_and_keeps_global_state():
    labels = _labels(5, 40)
    # LIFT's draw as published: global legacy seed, then shuffle each class's indices in label order
    np.random.seed(0)
    expected = []
    for c in np.unique(labels):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        expected.append(idx)
    np.random.seed(123)
    order = class_order(labels, 5, seed=0, selection="lift")
    after = np.random.rand()
    np.random.seed(123)
    assert after == np.random.rand()  # the global RNG was not touched
    for got, want in zip(order, expected):
        np.testing.assert_array_equal(got, want)


def test_rng_and_first_selection():
    labels = _labels(4, 30)
    rng = np.random.default_rng(7)
    for c, got in enumerate(class_order(labels, 4, seed=7, selection="rng")):
        np.testing.assert_array_equal(got, rng.permutation(np.flatnonzero(labels == c)))
    first = class_order(labels, 4, selection="first")
    assert all(np.all(np.diff(idx) > 0) and np.all(labels[idx] == c) for c, idx in enumerate(first))
    a, b = class_order(labels, 4, seed=0), class_order(labels, 4, seed=1)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))
    with pytest.raises(UserError, match="'random'"):
        class_order(labels, 4, selection="random")


def _cifar100_shaped_source():
    # real CIFAR-100 sizes (500 train / 100 test per class, shuffled order); the plan only reads labels, so the
    # images are one black pixel repeated (a view: no memory)
    def images(n):
        return ArrayImages(np.broadcast_to(np.zeros((1, 1, 1, 3), np.uint8), (n, 1, 1, 3)))

    splits = {"train": SourceSplit(_labels(100, 500), images(50_000)),
              "test": SourceSplit(_labels(100, 100, seed=4), images(10_000))}
    return Source([f"c{i}" for i in range(100)], splits, "test")


@pytest.mark.parametrize("imb,total", [(10, 19573), (50, 12608), (100, 10847)])
def test_cifar100_plan_full_size(tmp_path, imb, total):
    source = _cifar100_shaped_source()
    builder = Cifar100LT(cache_dir=str(tmp_path), name=f"imb{imb}", imb=float(imb), selection="lift")
    plan, counts, n_max = builder.plan(source)
    train_labels = source.splits["train"].labels
    assert n_max == 500 and len(plan["train"][1]) == total
    assert np.bincount(train_labels[plan["train"][1]], minlength=100).tolist() == lt_counts(500, imb, 100)
    val_idx = plan["validation"][1]
    assert plan["validation"][0] == "train" and not set(val_idx) & set(plan["train"][1])
    # val: up to 20 unused train images per class; class 0 uses all 500, so it has none
    assert np.bincount(train_labels[val_idx], minlength=100).tolist() == [min(20, 500 - n) for n in counts]
    assert plan["test"][0] == "test" and len(plan["test"][1]) == 10000


def test_cifar100_plan_test_slice(tmp_path):
    source = _cifar100_shaped_source()
    builder = Cifar100LT(cache_dir=str(tmp_path), name="imb100", val_source="test_slice", val_per_class=10)
    plan, _, _ = builder.plan(source)
    test_labels = source.splits["test"].labels
    (vsrc, val_idx), (tsrc, test_idx) = plan["validation"], plan["test"]
    assert vsrc == tsrc == "test" and len(val_idx) == 1000 and len(test_idx) == 9000
    assert not set(val_idx) & set(test_idx)
    # LT-Soups: the first 10 test images of each class, in source order
    assert sorted(val_idx) == sorted(i for c in range(100) for i in np.flatnonzero(test_labels == c)[:10])


def _label_dataset(counts):
    labels = np.repeat(np.arange(len(counts)), counts)
    feats = Features({"label": ClassLabel(num_classes=len(counts)), "pos": Value("int64")})
    return Dataset.from_dict({"label": labels, "pos": np.arange(len(labels))}, features=feats)


def test_capped_subset():
    counts = [50, 20, 8, 5]
    ds = _label_dataset(counts)
    sub, sub_counts = capped_subset(ds, counts, balance_factor=2, seed=0)
    assert sub_counts == [10, 10, 8, 5]
    assert np.bincount(sub["label"]).tolist() == sub_counts
    assert sub["pos"] == sorted(sub["pos"])  # source order kept
    again, _ = capped_subset(ds, counts, 2, seed=0)
    other, _ = capped_subset(ds, counts, 2, seed=1)
    assert again["pos"] == sub["pos"] and other["pos"] != sub["pos"]
    assert capped_subset(ds, counts, 1)[1] == [5, 5, 5, 5]
    with pytest.raises(UserError, match="do not match"):
        capped_subset(ds, [50, 20, 8, 6], 2)
    with pytest.raises(UserError, match="balance_factor=0.5"):
        capped_subset(ds, counts, 0.5)


def test_ltinfo_roundtrip_and_regroup(tmp_path):
    counts = [150, 101, 100, 20, 19, 3]
    info = LTInfo(dataset="x_lt", class_names=list("abcdef"), train_counts=counts, groups=assign_groups(counts),
                  imb=50.0, max_per_class=150)
    assert info.group_counts() == {"many": 2, "medium": 2, "few": 2}
    assert info.group_of(2) == "medium" and info.group_of(4) == "few"
    regrouped = info.with_thresholds(120, 10)
    assert regrouped.groups == ["many", "medium", "medium", "medium", "medium", "few"]
    assert regrouped.many_threshold == 120 and info.many_threshold == 100  # original unchanged
    info.save(tmp_path / "i.json")
    assert LTInfo.load(tmp_path / "i.json") == info
    assert LTInfo.from_dict({**info.to_dict(), "future_field": 1}) == info
    with pytest.raises(UserError, match="not found"):
        LTInfo.load(tmp_path / "missing.json")
