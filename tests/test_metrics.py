"""LT metrics on hand-computed cases, and the `evaluate` Metric wrapper (offline)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lt_utils.errors import UserError
from lt_utils.lt_metric import LongTailAccuracy
from lt_utils.metrics import compute_lt_metrics, groups_from_counts, scalar_metrics

REPO = Path(__file__).resolve().parents[1]

# Hand-computed 4-class case. Per class (true -> predicted):
#   class 0: 0 0 0 1   -> 3/4 = 75%
#   class 1: 1 2       -> 1/2 = 50%
#   class 2: 2 2 1     -> 2/3
#   class 3: 3         -> 100%
# Predicted counts: c0 3, c1 3, c2 3, c3 1.  F1 = 2TP/(support+predicted): 6/7, 2/5, 4/6, 2/2.
LABELS = [0, 0, 0, 0, 1, 1, 2, 2, 2, 3]
PREDS = [0, 0, 0, 1, 1, 2, 2, 2, 1, 3]
GROUPS = ["many", "many", "medium", "few"]


def _logits_for(preds, num_classes, seed=0):
    """Random logits whose argmax is `preds` (the predicted class gets +5)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(preds), num_classes, generator=gen)
    logits[torch.arange(len(preds)), torch.tensor(preds)] += 5.0
    return logits


def test_hand_computed_four_class_case():
    m = compute_lt_metrics(torch.tensor(PREDS), torch.tensor(LABELS), 4, GROUPS)
    assert m["num_samples"] == 10
    assert m["accuracy"] == pytest.approx(70.0)
    assert m["per_class_acc"] == pytest.approx([75.0, 50.0, 200 / 3, 100.0])
    assert m["per_class_samples"] == [4, 2, 3, 1]
    assert m["mean_class_acc"] == pytest.approx((75 + 50 + 200 / 3 + 100) / 4)
    assert m["many_acc"] == pytest.approx(62.5)
    assert m["medium_acc"] == pytest.approx(200 / 3)
    assert m["few_acc"] == pytest.approx(100.0)
    assert (m["many_classes"], m["medium_classes"], m["few_classes"]) == (2, 1, 1)
    assert m["macro_f1"] == pytest.approx(100 * 307 / 420)  # (6/7 + 2/5 + 2/3 + 1) / 4
    assert m["worst_class_acc"] == pytest.approx(50.0)
    assert m["harmonic_mean_acc"] == pytest.approx(100 * 24 / 35)  # 4 / (4/3 + 2 + 3/2 + 1)
    assert m["geometric_mean_acc"] == pytest.approx(100 * 0.25**0.25)  # (3/4 * 1/2 * 2/3 * 1)^(1/4)
    assert m["nll"] is None and m["many_nll"] is None


def test_logits_give_same_accuracies_and_torch_nll():
    logits = _logits_for(PREDS, 4)
    labels = torch.tensor(LABELS)
    from_logits = compute_lt_metrics(logits, labels, 4, GROUPS)
    from_preds = compute_lt_metrics(torch.tensor(PREDS), labels, 4, GROUPS)
    for key in ("accuracy", "mean_class_acc", "many_acc", "medium_acc", "few_acc", "macro_f1", "per_class_acc"):
        assert from_logits[key] == from_preds[key]
    per_sample = F.cross_entropy(logits, labels, reduction="none")
    assert from_logits["nll"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert from_logits["many_nll"] == pytest.approx(per_sample[labels <= 1].mean().item(), rel=1e-6)
    assert from_logits["medium_nll"] == pytest.approx(per_sample[labels == 2].mean().item(), rel=1e-6)
    assert from_logits["few_nll"] == pytest.approx(per_sample[labels == 3].item(), rel=1e-6)


def test_per_sample_nll_from_the_caller_matches_logits():
    logits = _logits_for(PREDS, 4)
    labels = torch.tensor(LABELS)
    from_logits = compute_lt_metrics(logits, labels, 4, GROUPS)
    sample_nll = F.cross_entropy(logits, labels, reduction="none")
    from_nll = compute_lt_metrics(logits.argmax(1), labels, 4, GROUPS, sample_nll=sample_nll)
    for key in ("nll", "many_nll", "medium_nll", "few_nll"):
        assert from_nll[key] == pytest.approx(from_logits[key], rel=1e-12)
    with pytest.raises(UserError, match="either logits or sample_nll"):
        compute_lt_metrics(logits, labels, 4, GROUPS, sample_nll=sample_nll)
    with pytest.raises(UserError, match="sample_nll has shape"):
        compute_lt_metrics(PREDS, LABELS, 4, GROUPS, sample_nll=sample_nll[:3])


def test_numpy_and_list_inputs_and_bf16_logits():
    logits = _logits_for(PREDS, 4)
    ref = compute_lt_metrics(logits, torch.tensor(LABELS), 4, GROUPS)
    assert compute_lt_metrics(logits.numpy(), np.array(LABELS), 4, GROUPS) == ref
    assert compute_lt_metrics(PREDS, LABELS, 4, GROUPS)["accuracy"] == ref["accuracy"]
    bf16 = compute_lt_metrics(logits.bfloat16(), torch.tensor(LABELS), 4, GROUPS)
    assert bf16["accuracy"] == ref["accuracy"]
    assert bf16["nll"] == pytest.approx(ref["nll"], rel=2e-2)


def test_ties_go_to_lowest_class_index():
    # All-equal logits: argmax ties resolve to class 0 (torch.argmax), and NLL is log(C).
    labels = torch.tensor([0, 1, 2, 2])
    m = compute_lt_metrics(torch.zeros(4, 3), labels, 3, None)
    assert m["per_class_acc"] == [100.0, 0.0, 0.0]
    assert m["accuracy"] == 25.0
    assert m["nll"] == pytest.approx(math.log(3))
    # A partial tie between classes 1 and 2 goes to 1.
    tied = torch.tensor([[0.0, 2.0, 2.0]])
    assert compute_lt_metrics(tied, torch.tensor([1]), 3, None)["accuracy"] == 100.0
    assert compute_lt_metrics(tied, torch.tensor([2]), 3, None)["accuracy"] == 0.0


def test_class_never_predicted_has_f1_zero():
    m = compute_lt_metrics([0, 0, 0, 0], [0, 0, 1, 1], 2, ["many", "few"])
    # class 0: TP 2, support 2, predicted 4 -> F1 2/3; class 1: never predicted -> F1 0.
    assert m["macro_f1"] == pytest.approx(100 / 3)
    assert m["worst_class_acc"] == 0.0
    assert m["few_acc"] == 0.0  # a real zero: the group has samples, all wrong
    assert m["harmonic_mean_acc"] == 0.0 and m["geometric_mean_acc"] == 0.0


def test_class_without_test_samples_is_left_out():
    # Class 2 has no test sample but is predicted once; class 3 has neither.
    m = compute_lt_metrics([0, 2, 1], [0, 0, 1], 4, ["many", "many", "medium", "few"])
    assert m["per_class_acc"] == [50.0, 100.0, None, None]
    assert m["per_class_samples"] == [2, 1, 0, 0]
    assert m["classes_with_samples"] == 2
    assert m["mean_class_acc"] == pytest.approx(75.0)  # (50 + 100) / 2, not / 4
    assert m["worst_class_acc"] == 50.0
    # Macro-F1 over classes with samples: class 0 2*1/(2+1), class 1 2*1/(1+1).
    assert m["macro_f1"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    # "medium" (class 2) and "few" (class 3) have classes but no test samples: None, not 0.
    assert m["medium_acc"] is None and m["few_acc"] is None
    assert (m["medium_classes"], m["few_classes"]) == (1, 1)


def test_empty_group_is_none_and_json_serialisable():
    m = compute_lt_metrics(_logits_for([0, 1, 1], 2), [0, 1, 0], 2, ["many", "medium"])
    assert m["few_acc"] is None and m["few_classes"] == 0 and m["few_nll"] is None
    assert m["many_acc"] == 50.0 and m["medium_acc"] == 100.0
    assert json.loads(json.dumps(m, allow_nan=False)) == m


def test_prefix_and_scalar_metrics():
    m = compute_lt_metrics(PREDS, LABELS, 4, GROUPS, prefix="eval_")
    assert all(key.startswith("eval_") for key in m)
    assert m["eval_accuracy"] == pytest.approx(70.0)
    scalars = scalar_metrics(m)
    assert "eval_per_class_acc" not in scalars and "eval_nll" not in scalars
    assert scalars["eval_few_classes"] == 1


def confusion_matrix(preds, labels, num_classes):
    """The oracle: C x C counts, rows = true class, columns = predicted class (compute_lt_metrics never builds it)."""
    preds, labels = torch.as_tensor(preds).long(), torch.as_tensor(labels).long()
    return torch.bincount(labels * num_classes + preds, minlength=num_classes * num_classes).view(num_classes, num_classes)


def test_matches_confusion_matrix_on_random_case():
    gen = torch.Generator().manual_seed(1)
    num_classes = 50
    labels = torch.randint(0, num_classes, (2000,), generator=gen)
    noise = torch.randint(0, num_classes, (2000,), generator=gen)
    preds = torch.where(torch.rand(2000, generator=gen) < 0.6, labels, noise)
    cm = confusion_matrix(preds, labels, num_classes).double()
    m = compute_lt_metrics(preds, labels, num_classes, None)
    support, predicted, tp = cm.sum(1), cm.sum(0), cm.diag()
    assert m["per_class_acc"] == pytest.approx((100 * tp / support).tolist())
    assert m["macro_f1"] == pytest.approx((100 * 2 * tp / (support + predicted)).mean().item())
    assert m["accuracy"] == pytest.approx(100 * tp.sum().item() / 2000)


def test_confusion_matrix_rows_are_true_classes():
    cm = confusion_matrix([1, 1, 0], [0, 1, 1], 2)
    assert cm.tolist() == [[0, 1], [1, 1]]


def test_inat_sized_random_case():
    # 8,142 classes: vectorised counts, no C x C matrix. Sizes kept small so the test stays fast.
    num_classes = 8142
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, num_classes, (5 * num_classes,), generator=gen)
    noise = torch.randint(0, num_classes, labels.shape, generator=gen)
    preds = torch.where(torch.rand(labels.shape, generator=gen) < 0.5, labels, noise)
    counts = torch.randint(1, 1000, (num_classes,), generator=gen)
    groups = groups_from_counts(counts.numpy())
    m = compute_lt_metrics(preds, labels, num_classes, groups)
    assert m["accuracy"] == pytest.approx(100 * (preds == labels).double().mean().item())
    assert m["classes_with_samples"] == labels.unique().numel()
    assert len(m["per_class_acc"]) == num_classes
    assert m["many_classes"] + m["medium_classes"] + m["few_classes"] == num_classes
    logits = torch.randn(1000, num_classes, generator=gen)
    with_logits = compute_lt_metrics(logits, labels[:1000], num_classes, groups)
    assert with_logits["nll"] == pytest.approx(F.cross_entropy(logits, labels[:1000]).item(), rel=1e-5)


def test_groups_from_counts_boundaries():
    assert groups_from_counts([101, 100, 20, 19]) == ["many", "medium", "medium", "few"]
    assert groups_from_counts([101, 100, 20, 19], many_threshold=99, few_threshold=21) == [
        "many",
        "many",
        "few",
        "few",
    ]
    for rho, expected in ((100, (35, 35, 30)), (50, (41, 41, 18)), (10, (69, 31, 0))):
        counts = [int(500 * (1 / rho) ** (i / 99)) for i in range(100)]
        groups = groups_from_counts(counts)
        assert tuple(groups.count(name) for name in ("many", "medium", "few")) == expected


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: compute_lt_metrics([0, 5], [0, 1], 4, None), "predictions must lie in"),
        (lambda: compute_lt_metrics([0, 1], [0, -1], 4, None), "labels must lie in"),
        (lambda: compute_lt_metrics(torch.zeros(2, 3), [0, 1], 4, None), "logits must have shape"),
        (lambda: compute_lt_metrics(torch.full((1, 2), math.nan), [0], 2, None), "NaN"),
        (lambda: compute_lt_metrics([0, 1], [0], 2, None), "2 predictions but 1 labels"),
        (lambda: compute_lt_metrics([], [], 2, None), "no samples"),
        (lambda: compute_lt_metrics([0], [0], 2, ["many"]), "groups has 1 entries"),
        (lambda: compute_lt_metrics([0], [0], 2, ["many", "tail"]), "unknown group names"),
        (lambda: groups_from_counts([5], many_threshold=10, few_threshold=20), "must not exceed"),
    ],
)
def test_user_errors(call, message):
    with pytest.raises(UserError, match=message):
        call()


# --- the evaluate Metric -------------------------------------------------------------------------


def test_evaluate_metric_matches_compute_lt_metrics():
    logits = _logits_for(PREDS, 4, seed=3)
    metric = LongTailAccuracy(keep_in_memory=True)
    metric.add_batch(predictions=logits[:6].numpy(), references=LABELS[:6])
    metric.add_batch(predictions=logits[6:].numpy(), references=LABELS[6:])
    got = metric.compute(train_counts=[500, 101, 50, 3])
    assert got == compute_lt_metrics(logits, torch.tensor(LABELS), 4, GROUPS)
    assert got["nll"] is not None


def test_evaluate_metric_integer_predictions_and_thresholds():
    metric = LongTailAccuracy(keep_in_memory=True)
    got = metric.compute(predictions=PREDS, references=LABELS, train_counts=[500, 60, 40, 3], many_threshold=50)
    assert got == compute_lt_metrics(PREDS, LABELS, 4, GROUPS)
    # Without groups, num_classes comes from the largest id seen.
    plain = LongTailAccuracy(keep_in_memory=True).compute(predictions=[0, 2], references=[0, 1])
    assert plain["num_classes"] == 3 and plain["many_acc"] is None
    with pytest.raises(UserError, match="either train_counts or groups"):
        LongTailAccuracy(keep_in_memory=True).compute(
            predictions=[0], references=[0], train_counts=[1], groups=["few"]
        )


_OFFLINE_SCRIPT = """
import json, sys, evaluate, torch
from lt_utils.lt_metric import LongTailAccuracy
from lt_utils.metrics import compute_lt_metrics
logits = torch.tensor(json.loads(sys.argv[1])); labels = json.loads(sys.argv[2]); groups = json.loads(sys.argv[3])
loaded = evaluate.load(sys.argv[4])
direct = LongTailAccuracy()
print(json.dumps({
    "module": type(loaded).__module__,
    "loaded": loaded.compute(predictions=logits.numpy(), references=labels, groups=groups),
    "direct": direct.compute(predictions=logits.numpy(), references=labels, groups=groups),
    "reference": compute_lt_metrics(logits, torch.tensor(labels), len(groups), groups),
}))
"""


@pytest.mark.slow  # a fresh offline interpreter
def test_evaluate_load_from_path_works_offline(tmp_path):
    logits = _logits_for(PREDS, 4, seed=5)
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    }
    args = [json.dumps(v) for v in (logits.tolist(), LABELS, GROUPS)] + [str(REPO / "lt_utils" / "lt_metric.py")]
    proc = subprocess.run(
        [sys.executable, "-c", _OFFLINE_SCRIPT, *args], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # evaluate.load imported its own copy from the modules cache, not lt_utils.lt_metric.
    assert out["module"].startswith("evaluate_modules.metrics.lt_metric.")
    assert out["loaded"] == out["reference"] == out["direct"]
    assert out["loaded"]["accuracy"] == pytest.approx(70.0)
