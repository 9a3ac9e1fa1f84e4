"""`evaluate` Metric for long-tail classification; needs no Hub download.

Two ways to use it, both offline:

    from lt_utils.lt_metric import LongTailAccuracy
    metric = LongTailAccuracy()

    metric = evaluate.load("path/to/lt_utils/lt_metric.py")

    metric.add_batch(predictions=logits_or_preds, references=labels)  # any number of times
    results = metric.compute(train_counts=train_counts)               # or groups=[...]

`predictions` are integer class ids or per-class logits (then NLL is reported too). The result is
the dict of `lt_utils.metrics.compute_lt_metrics` (percent; empty groups None).

Note for `evaluate.load`: it copies this file and the modules it imports relatively (`.metrics`,
`.errors`) into its modules cache, so those imports must stay relative, unindented and at top level.
"""
import datasets
import evaluate
import numpy as np

# evaluate.load copies only the modules this file imports: metrics.py needs axes.py, and axes.py registry.py, beside them
# (an import line takes no comment: evaluate would read it as a URL)
from .axes import SELECTABLE
from .errors import UserError
from .metrics import compute_lt_metrics, groups_from_counts
from .registry import Registry

_DESCRIPTION = (
    "Long-tail classification metrics: top-1, mean per-class accuracy, many/medium/few accuracy "
    "(groups by training count), macro-F1, worst/harmonic/geometric class accuracy, NLL for logits."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions: integer class ids [N], or logits [N, C] (then `nll` is computed too).
    references: integer class ids [N].
    train_counts: training images per class; groups come from the thresholds below.
    groups: "many"/"medium"/"few" per class, instead of train_counts.
    many_threshold: classes with more training images are "many" (default 100).
    few_threshold: classes with fewer training images are "few" (default 20).
    num_classes: defaults to len(train_counts or groups), else the logits width, else max id + 1.
Returns:
    dict of percentages (0-100) and counts; see lt_utils.metrics.compute_lt_metrics.
Examples:
    >>> metric = LongTailAccuracy()
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0], train_counts=[200, 5])["many_acc"]
    50.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LongTailAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            # Logits first: an integer id cannot be encoded as a list, so inference falls through.
            features=[
                datasets.Features(
                    {"predictions": datasets.List(datasets.Value("float32")), "references": datasets.Value("int64")}
                ),
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            ],
        )

    def _compute(
        self,
        predictions,
        references,
        train_counts=None,
        groups=None,
        many_threshold=100,
        few_threshold=20,
        num_classes=None,
    ):
        if train_counts is not None and groups is not None:
            raise UserError("pass either train_counts or groups, not both")
        scores = _stack_rows(predictions)
        if train_counts is not None:
            groups = groups_from_counts(train_counts, many_threshold, few_threshold)
        num_classes = num_classes or _infer_num_classes(scores, references, groups)
        return compute_lt_metrics(scores, np.asarray(references), num_classes, groups)


def _stack_rows(predictions):
    """Python lists from Arrow -> an int64 [N] or float32 [N, C] array; ragged logits rows are an error."""
    if len(predictions) and isinstance(predictions[0], (list, tuple, np.ndarray)):
        widths = {len(row) for row in predictions}
        if len(widths) != 1:
            raise UserError(f"logits rows have different lengths {sorted(widths)[:5]}; pass [N, C] logits")
        return np.asarray(predictions, dtype=np.float32)
    return np.asarray(predictions, dtype=np.int64)


def _infer_num_classes(scores, references, groups):
    if groups is not None:
        return len(groups)
    if scores.ndim == 2:
        return scores.shape[1]
    return int(max(scores.max(initial=0), np.asarray(references).max(initial=0))) + 1
