"""Long-tail classification metrics: overall, class-balanced and many/medium/few accuracy, macro-F1, NLL.

Everything is derived from three per-class counts (test samples, correct, predicted), each one
`bincount`, so the cost is O(N + C) and 8,142 iNat classes need no C x C matrix and no Python loop.

Conventions (all accuracies in percent, 0-100):
- A class with no test sample has accuracy None and is left out of every class average
  (mean-class, groups, macro-F1, worst, harmonic, geometric).
- A group (many/medium/few) with no class that has test samples reports None, never 0.
- Ties in the argmax of logits go to the lowest class index (torch.argmax semantics).
- Macro-F1 averages over the classes with test samples; a class never predicted has F1 0.
  sklearn's default also counts classes that are only predicted (F1 0 each); the two agree
  whenever every predicted class appears in the test set, as on the LT benchmarks.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from .axes import SELECTABLE
from .errors import UserError, require

GROUP_NAMES = ("many", "medium", "few")


def groups_from_counts(train_counts, many_threshold=100, few_threshold=20):
    """Group per class by training count: > many_threshold "many", < few_threshold "few", else "medium"."""
    counts = np.asarray(train_counts)
    require(counts.ndim == 1 and counts.size > 0, "train_counts must be a non-empty list of per-class counts")
    require(
        few_threshold <= many_threshold,
        f"few_threshold ({few_threshold}) must not exceed many_threshold ({many_threshold})",
    )
    groups = np.where(counts > many_threshold, "many", np.where(counts < few_threshold, "few", "medium"))
    return groups.tolist()


def compute_lt_metrics(logits_or_preds, labels, num_classes, groups, prefix="", sample_nll=None):
    """All LT metrics as a JSON-serialisable dict (see the module docstring for conventions).

    `logits_or_preds`: float logits [N, C] (NLL is then computed too) or integer predictions [N].
    `groups`: one of "many"/"medium"/"few" per class (see groups_from_counts), or None.
    `sample_nll`: per-sample NLL [N] computed by the caller, with integer predictions: under
    Accelerate, gathering it is far cheaper than gathering [N, C] logits (8,142 floats per image).
    """
    preds, labels, nll = _validated_inputs(logits_or_preds, labels, num_classes, sample_nll)
    group_of_class = _group_array(groups, num_classes)

    support = torch.bincount(labels, minlength=num_classes).cpu().double()
    correct = torch.bincount(labels[preds == labels], minlength=num_classes).cpu().double()
    predicted = torch.bincount(preds, minlength=num_classes).cpu().double()
    has = support > 0
    class_acc = torch.where(has, 100 * correct / support.clamp(min=1), torch.nan)
    # 2TP / (2TP + FP + FN) = 2TP / (support + predicted): no 0/0 for classes with samples.
    f1 = 100 * 2 * correct[has] / (support[has] + predicted[has])

    out = {
        "num_samples": int(labels.numel()),
        "num_classes": int(num_classes),
        "classes_with_samples": int(has.sum()),
        "accuracy": 100 * correct.sum().item() / labels.numel(),
        "mean_class_acc": class_acc[has].mean().item(),
        **_group_metrics(class_acc, has, group_of_class),
        "macro_f1": f1.mean().item(),
        "worst_class_acc": class_acc[has].min().item(),
        "harmonic_mean_acc": _harmonic_mean(class_acc[has]),
        "geometric_mean_acc": _geometric_mean(class_acc[has]),
        **_nll_metrics(nll, labels, group_of_class),
        "per_class_acc": [None if math.isnan(a) else a for a in class_acc.tolist()],
        "per_class_samples": [int(n) for n in support.tolist()],
    }
    return {prefix + key: value for key, value in out.items()}


def with_split_groups(metrics, info):
    """Under --groups_from_imb, add the many/medium/few accuracies of the split's own groups as `split_groups`."""
    own = info.split_groups
    if list(own) == list(info.groups):
        return metrics
    acc = torch.tensor([math.nan if a is None else a for a in metrics["per_class_acc"]], dtype=torch.float64)
    return {**metrics, "split_groups": _group_metrics(acc, ~acc.isnan(), _group_array(own, len(own)))}


def scalar_metrics(metrics):
    """The scalar entries only (no per-class lists, no None): for trackers and log lines."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _validated_inputs(logits_or_preds, labels, num_classes, sample_nll):
    """(preds [N], labels [N], per-sample NLL [N] or None), checked against each other and num_classes."""
    scores = torch.as_tensor(logits_or_preds).detach()
    labels = _as_long(labels, "labels").to(scores.device)
    require(int(num_classes) > 0, f"num_classes must be positive, got {num_classes}")
    require(labels.numel() > 0, "no samples to evaluate; check the evaluation split is not empty")
    _check_range(labels, "labels", num_classes)
    preds, nll = _preds_and_nll(scores, labels, num_classes)
    require(preds.numel() == labels.numel(), f"{preds.numel()} predictions but {labels.numel()} labels")
    _check_range(preds, "predictions", num_classes)
    if sample_nll is not None:
        require(nll is None, "pass either logits or sample_nll, not both")
        nll = torch.as_tensor(sample_nll).detach().to(labels.device).double()
        require(nll.shape == labels.shape, f"sample_nll has shape {tuple(nll.shape)}, expected [{labels.numel()}]")
    return preds, labels, nll


def _as_long(values, name):
    tensor = torch.as_tensor(values).detach()
    require(tensor.ndim == 1, f"{name} must be 1-D class ids, got shape {tuple(tensor.shape)}")
    require(
        not tensor.is_floating_point() or bool((tensor == tensor.round()).all()),
        f"{name} must be integer class ids, got fractional values",
    )
    return tensor.long()


def _preds_and_nll(scores, labels, num_classes):
    """Predictions (argmax for logits) and per-sample NLL (None for integer predictions)."""
    if not scores.is_floating_point():
        return _as_long(scores, "predictions"), None
    require(
        scores.ndim == 2 and scores.shape[1] == num_classes,
        f"logits must have shape [N, {num_classes}], got {tuple(scores.shape)}; "
        "pass integer predictions [N] or fix num_classes",
    )
    require(scores.shape[0] == labels.numel(), f"{scores.shape[0]} logits rows but {labels.numel()} labels")
    if torch.isnan(scores).any():
        raise UserError("logits contain NaN; the model diverged or its weights failed to load")
    # Upcast: bf16 logits lose ~3 digits in log-softmax.
    nll = F.cross_entropy(scores.float(), labels, reduction="none").double()
    return scores.argmax(dim=1), nll


def _check_range(ids, name, num_classes):
    if ids.numel() and (ids.min() < 0 or ids.max() >= num_classes):
        raise UserError(
            f"{name} must lie in [0, {num_classes}), found {ids.min().item()}..{ids.max().item()}; "
            "the dataset and the model disagree on the number of classes"
        )


def _group_array(groups, num_classes):
    if groups is None:
        return None
    arr = np.asarray(groups, dtype=object)
    require(arr.shape == (num_classes,), f"groups has {arr.size} entries for {num_classes} classes")
    unknown = set(arr.tolist()) - set(GROUP_NAMES)
    require(not unknown, f"unknown group names {sorted(map(str, unknown))}; use many/medium/few")
    return arr


def _group_metrics(class_acc, has, group_of_class):
    out = {}
    for name in GROUP_NAMES:
        in_group = _mask(group_of_class, name, len(has))
        evaluated = in_group & has
        out[f"{name}_acc"] = class_acc[evaluated].mean().item() if evaluated.any() else None
    for name in GROUP_NAMES:
        out[f"{name}_classes"] = int(_mask(group_of_class, name, len(has)).sum())
    return out


def _nll_metrics(nll, labels, group_of_class):
    """Mean per-sample NLL, overall and over the samples whose true class is in each group."""
    out = {"nll": None if nll is None else nll.mean().item()}
    for name in GROUP_NAMES:
        out[f"{name}_nll"] = None
        if nll is not None and group_of_class is not None:
            in_group = _mask(group_of_class, name, None).to(labels.device)[labels]
            out[f"{name}_nll"] = nll[in_group].mean().item() if in_group.any() else None
    return out


def _mask(group_of_class, name, num_classes):
    if group_of_class is None:
        return torch.zeros(num_classes or 0, dtype=torch.bool)
    return torch.from_numpy(group_of_class == name)


def _harmonic_mean(acc):
    # A zero accuracy sends the harmonic mean to its limit 0 instead of a division by zero.
    return 0.0 if bool((acc == 0).any()) else (len(acc) / (1 / acc).sum()).item()


def _geometric_mean(acc):
    return 0.0 if bool((acc == 0).any()) else acc.log().mean().exp().item()


def check_select_metric(name):
    require(name in SELECTABLE, f"--select_metric {name!r} is not a validation metric; use one of {', '.join(SELECTABLE)}")


def selection_score(metrics, name):
    """Higher is better: NLLs are negated. None when the metric is empty (e.g. a group without val images)."""
    value = metrics.get(name)
    if value is None:
        return None
    return -value if name.endswith("nll") else value
