"""Parity with the reference code, by numbers: which source images each selection mode puts in the LT split, which
ones LT-Soups' capped subsets hold, its val/test slice, warm-up, EMA and validation schedule.

The CIFAR sources are written in the real pickle format with every image spelling its own source index in its
pixels, so the images the project writes can be traced back to source indices. The expected indices come from
reimplementations of each reference rule written here, independently of lt_utils."""
import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

from lt_utils.data import capped_subset, load_lt_dataset
from lt_utils.engine import EMA, linear_warmup_cosine
from lt_utils.errors import UserError
from lt_utils.schedule import StepPlan, eval_interval, lr_at
from tests.helpers_data import decode_index, write_cifar10, write_cifar100

C100_TRAIN, C100_TEST, C10_TRAIN, C10_TEST = 60, 12, 60, 110


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("index_cifar")
    c100 = write_cifar100(root / "c100", per_class_train=C100_TRAIN, per_class_test=C100_TEST, seed=3, index_pixels=True)
    c10 = write_cifar10(root / "c10", per_class_train=C10_TRAIN, per_class_test=C10_TEST, seed=4, index_pixels=True)
    return {"c100": c100, "c10": c10, "cache": root / "hf_cache"}


def source_labels(folder, split):
    """Labels of a written source split, read from the pickles directly."""
    import pickle

    if (folder / "cifar-100-python").is_dir():
        d = pickle.loads((folder / "cifar-100-python" / split).read_bytes(), encoding="bytes")
        return np.asarray(d[b"fine_labels"])
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    return np.concatenate([pickle.loads((folder / "cifar-10-batches-py" / n).read_bytes(), encoding="bytes")[b"labels"]
                           for n in names])


def split_indices(split):
    return [decode_index(image) for image in split["image"]]


# ---- the reference rules, rewritten here -----------------------------------------------------------------------

def reference_counts(n_max, imb_factor, num_classes):
    """The reference repositories' CIFAR-LT counts: int(img_max * imb_factor ** (i / (C - 1))), imb_factor = 1/rho."""
    return [int(n_max * (imb_factor ** (i / (num_classes - 1.0)))) for i in range(num_classes)]


def reference_lt_train(labels, counts, rule, seed=0):
    """The source indices of the reference LT train set, in its own order (class by class, as drawn).

    rng: LT-Soups' CIFAR-100 (`default_rng(seed)`, `rng.shuffle` of each class's indices, keep the first n_i).
    lift: LIFT's and LT-Soups' CIFAR-10 (`np.random.seed(seed)`, `np.random.shuffle` per class).
    first: LOS (the first n_i indices of each class, no shuffle).
    """
    order = []
    rng = np.random.default_rng(seed)
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        for c, n in enumerate(counts):
            idx = np.where(labels == c)[0]
            if rule == "rng":
                rng.shuffle(idx)
            elif rule == "lift":
                np.random.shuffle(idx)
            order.extend(idx[:n].tolist())
    finally:
        np.random.set_state(saved)
    return order


def reference_capped_subset(train_order, train_labels, balance_factor, seed):
    """LT-Soups' `sample_loader`: positions grouped by class (in the train set's order), one `default_rng(seed)`,
    `rng.choice(positions, min(cap, n), replace=False)` for every class; returns the chosen source indices."""
    counts = np.bincount(train_labels)
    cap = int(counts[np.argmin(counts)] * balance_factor)
    by_class = {label: [] for label in set(train_labels.tolist())}
    for position, label in enumerate(train_labels.tolist()):
        by_class[label].append(position)
    rng = np.random.default_rng(seed)
    chosen = []
    for label, positions in by_class.items():
        chosen.extend(rng.choice(np.array(positions), min(cap, len(positions)), replace=False).tolist())
    return sorted(train_order[p] for p in chosen)


def reference_val_test(test_labels, val_per_class):
    """LT-Soups' CIFAR val / test: the first `val_per_class` test images of each class / the rest."""
    val, test = [], []
    for c in range(test_labels.max() + 1):
        idx = np.where(test_labels == c)[0]
        val.extend(idx[:val_per_class].tolist())
        test.extend(idx[val_per_class:].tolist())
    return sorted(val), sorted(test)


# ---- LT split: each selection mode ------------------------------------------------------------------------------

@pytest.mark.parametrize("selection", ["rng", "lift", "first"])
def test_cifar100_lt_train_images_equal_the_reference_rule(sources, selection):
    ds, info = load_lt_dataset("cifar100_lt", imb=10, data_dir=sources["c100"], selection=selection,
                               val_source="test_slice", val_per_class=10, cache_dir=sources["cache"])
    labels = source_labels(sources["c100"], "train")
    counts = reference_counts(C100_TRAIN, 0.1, 100)
    want = reference_lt_train(labels, counts, selection)
    got = split_indices(ds["train"])
    assert info.train_counts == counts and len(got) == sum(counts) == 2_306
    assert got == sorted(want)  # the same images, written in source order
    # draw_rank: each image's place in its class's draw, which is its place in the reference train set's class block
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank_of = {src: pos - starts[labels[src]] for pos, src in enumerate(want)}
    assert ds["train"]["draw_rank"] == [rank_of[i] for i in got]


def test_selection_modes_pick_different_images(sources):
    picks = {}
    for selection in ("rng", "lift", "first"):
        ds, _ = load_lt_dataset("cifar100_lt", imb=10, data_dir=sources["c100"], selection=selection,
                                val_source="test_slice", val_per_class=10, cache_dir=sources["cache"])
        picks[selection] = set(split_indices(ds["train"]))
    assert len(picks["rng"] & picks["lift"]) < 0.7 * len(picks["rng"])
    assert len(picks["rng"] & picks["first"]) < 0.7 * len(picks["rng"])


def test_test_slice_is_lt_soups_val_and_test(sources):
    ds, info = load_lt_dataset("cifar100_lt", imb=10, data_dir=sources["c100"], val_source="test_slice",
                               val_per_class=10, cache_dir=sources["cache"])
    val, test = reference_val_test(source_labels(sources["c100"], "test"), 10)
    assert split_indices(ds["validation"]) == val and split_indices(ds["test"]) == test
    assert info.split_sizes["validation"] == 1_000 and info.split_sizes["test"] == 200  # 100 x (12 - 10); CIFAR-100: 9,000


# ---- LT-Soups' capped subsets --------------------------------------------------------------------------------

@pytest.mark.parametrize("balance_factor,seed", [(1, 0), (2, 1), (4, 2), (8, 6)])
def test_lt_soups_capped_subset_equals_the_reference(sources, balance_factor, seed):
    ds, info = load_lt_dataset("cifar100_lt", imb=10, data_dir=sources["c100"], val_source="test_slice",
                               val_per_class=10, cache_dir=sources["cache"])
    labels = source_labels(sources["c100"], "train")
    order = reference_lt_train(labels, info.train_counts, "rng")
    want = reference_capped_subset(order, labels[order], balance_factor, seed)
    sub, sub_counts = capped_subset(ds["train"], info.train_counts, balance_factor, seed=seed, selection="lt_soups")
    assert split_indices(sub) == want
    cap = 6 * balance_factor
    assert sub_counts == [min(n, cap) for n in info.train_counts] and len(want) == sum(sub_counts)


def test_project_rng_subset_holds_other_images(sources):
    """The project's own subset rule is kept (--subset_selection rng), and it is not LT-Soups' draw."""
    ds, info = load_lt_dataset("cifar100_lt", imb=10, data_dir=sources["c100"], val_source="test_slice",
                               val_per_class=10, cache_dir=sources["cache"])
    ours, counts = capped_subset(ds["train"], info.train_counts, 1, seed=0, selection="rng")
    theirs, same_counts = capped_subset(ds["train"], info.train_counts, 1, seed=0, selection="lt_soups")
    assert counts == same_counts == [6] * 100
    overlap = len(set(split_indices(ours)) & set(split_indices(theirs)))
    assert overlap < 0.5 * 600


def test_cifar10_legacy_split_and_lt_soups_subset(sources):
    """LT-Soups' CIFAR-10-LT: legacy global-RNG draw (--selection lift), val / test = 100 / rest per class."""
    ds, info = load_lt_dataset("cifar10_lt", imb=10, data_dir=sources["c10"], selection="lift",
                               val_source="test_slice", val_per_class=100, cache_dir=sources["cache"])
    labels = source_labels(sources["c10"], "train")
    counts = reference_counts(C10_TRAIN, 0.1, 10)
    order = reference_lt_train(labels, counts, "lift")
    assert info.train_counts == counts and split_indices(ds["train"]) == sorted(order)
    val, test = reference_val_test(source_labels(sources["c10"], "test"), 100)
    assert split_indices(ds["validation"]) == val and split_indices(ds["test"]) == test and len(test) == 100
    for balance_factor, seed in ((1, 0), (4, 2)):
        sub, _ = capped_subset(ds["train"], info.train_counts, balance_factor, seed=seed, selection="lt_soups")
        assert split_indices(sub) == reference_capped_subset(order, labels[order], balance_factor, seed)


def test_lt_soups_subset_needs_the_draw_rank_column():
    from datasets import ClassLabel, Dataset, Features

    ds = Dataset.from_dict({"label": [0, 0, 1]}, features=Features({"label": ClassLabel(num_classes=2)}))
    with pytest.raises(UserError, match="no draw_rank column"):
        capped_subset(ds, [2, 1], 1, selection="lt_soups")
    with pytest.raises(UserError, match="not one of rng, lt_soups"):
        capped_subset(ds, [2, 1], 1, selection="lt-soups")


# ---- warm-up, EMA, validation schedule -----------------------------------------------------------------------

def reference_lr_factors(n_steps):
    """LT-Soups' LambdaLR table: interp(1e-6 -> 1) over warm-up steps 0..wu, then cosine to 0.1 over n - wu steps."""
    wu = int(max(20, 0.01 * n_steps))
    warmup = np.interp(np.arange(1 + wu), [0, wu], [1e-6, 1])
    xx = np.arange(n_steps - wu) / (n_steps - wu)
    return np.concatenate([warmup, 0.1 + 0.9 * (np.cos(np.pi * xx) + 1) / 2])


@pytest.mark.parametrize("n_steps", [100, 140, 230, 850, 2550, 3000])
def test_warmup_start_factor_gives_lt_soups_learning_rates(n_steps):
    from lt_utils.spec import OptimSpec

    optim = OptimSpec(num_warmup_steps=None, optimizer="adamw", learning_rate=3e-5, lr_scheduler_type="cosine",
                      min_lr_ratio=0.1, warmup_start_factor=1e-6)
    schedule = linear_warmup_cosine(optim, StepPlan(n_steps, n_steps, n_steps, 1))
    got = np.array([schedule(step) for step in range(n_steps)])
    np.testing.assert_allclose(got, 3e-5 * reference_lr_factors(n_steps)[:n_steps], rtol=1e-12, atol=0)
    assert got[0] == pytest.approx(3e-11)
    # the project's default warm-up starts at lr / warmup steps instead
    assert lr_at(0, 3e-5, n_steps, "cosine", 20, 0.1) == pytest.approx(3e-5 / 20)


def test_ema_first_step_is_torch_averaged_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    reference = AveragedModel(model, avg_fn=get_ema_avg_fn(0.99))
    ema, from_initial = EMA(model, 0.99, start="first_step"), EMA(model, 0.99)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(6):
        x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        reference.update_parameters(model)
        ema.update(model)
        from_initial.update(model)
        if step == 1:  # a resumed EMA carries on the same
            state = {k: (v.copy() if isinstance(v, dict) else v) for k, v in ema.state_dict().items()}
            ema = EMA(model, 0.5, start="initial")
            ema.load_state_dict(state)
    want = dict(reference.module.named_parameters())
    for name, value in ema.shadow.items():
        torch.testing.assert_close(value, want[name].detach(), rtol=0, atol=1e-7)
    gap = max((from_initial.shadow[n] - want[n].detach()).abs().max().item() for n in want)
    assert gap > 1e-3  # starting from the initial weights is a different average


def test_num_evals_is_lt_soups_eval_schedule():
    # LT-Soups validates when (step + 1) % (n // 5) == 0, for 0-based step < n
    for n in (100, 140, 231, 578, 850):
        ref = [s + 1 for s in range(n) if (s + 1) % (n // 5) == 0]
        interval = eval_interval(5, n)
        assert [s for s in range(1, n + 1) if s % interval == 0] == ref and len(ref) == 5
    assert eval_interval(5, 3) == 1


@pytest.mark.parametrize("flags,message", [
    (["--num_evals", "5", "--eval_steps", "100"], "both set the validation schedule"),
    (["--num_evals", "0"], "--num_evals 0 is out of range"),
    (["--warmup_start_factor", "2"], "--warmup_start_factor 2 is out of range"),
])
def test_schedule_flag_errors_leave_the_output_dir_alone(tmp_path, capsys, flags, message):
    import train_lt

    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("earlier run")
    with pytest.raises(SystemExit) as exit_info:
        train_lt.main(["--output_dir", str(out), "--overwrite_output_dir", *flags])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1] and "Traceback" not in "\n".join(err)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "earlier run"
