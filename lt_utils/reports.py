"""Human-readable outputs of an evaluation: markdown table, per-class CSV, per-class accuracy plot.

All take the dict of `lt_utils.metrics.compute_lt_metrics` (unprefixed keys). An empty group is
shown as "—", never as 0. Files are written atomically.
"""
import csv
import io
import math
from pathlib import Path

from .errors import require
from .fileio import atomic_write_bytes, atomic_write_text
from .metrics import GROUP_NAMES

EMPTY = "—"

# (header, metrics key, decimals)
_TABLE_COLUMNS = (
    ("top-1", "accuracy", 2),
    ("mean-class", "mean_class_acc", 2),
    ("many", "many_acc", 2),
    ("medium", "medium_acc", 2),
    ("few", "few_acc", 2),
    ("macro-F1", "macro_f1", 2),
    ("worst", "worst_class_acc", 2),
    ("NLL", "nll", 4),
)
_CSV_HEADER = ("class_id", "class_name", "train_count", "group", "test_samples", "accuracy")
_GROUP_COLORS = {"many": "#4C72B0", "medium": "#DD8452", "few": "#55A868"}


def format_markdown_table(runs):
    """One row per run ({name: metrics}); accuracies in percent, NLL in nats, missing values "—"."""
    header = ["run", *(title for title, _, _ in _TABLE_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(_TABLE_COLUMNS)) + "|"]
    for name, metrics in runs.items():
        cells = [_escape(str(name)), *(_fmt(metrics.get(key), digits) for _, key, digits in _TABLE_COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def describe_outputs(folder):
    """Where a command wrote, as one line: the folder, absolute, and what it holds (step_* resume states counted)."""
    folder = Path(folder).resolve()
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    steps = [p for p in entries if p.is_dir() and p.name.startswith("step_")]
    names = [p.name + ("/" if p.is_dir() else "") for p in entries if p not in steps and not p.name.startswith(".")]
    if steps:
        names.append(f"{len(steps)} resume state{'s' if len(steps) > 1 else ''} (step_*/)")
    return f"outputs in {folder}: {', '.join(names) or 'nothing'}"


def write_per_class_csv(path, metrics, class_names, train_counts, groups):
    """class_id,class_name,train_count,group,test_samples,accuracy; accuracy empty without test samples."""
    accs, samples = metrics["per_class_acc"], metrics["per_class_samples"]
    _check_lengths(len(accs), class_names=class_names, train_counts=train_counts, groups=groups)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(_CSV_HEADER)
    for class_id, row in enumerate(zip(class_names, train_counts, groups, samples, accs)):
        name, count, group, n_test, acc = row
        writer.writerow([class_id, name, int(count), group, int(n_test), "" if acc is None else f"{acc:.4f}"])
    atomic_write_text(path, buffer.getvalue())


def plot_per_class_accuracy(path, metrics, train_counts, groups, title=None):
    """PNG: per-class test accuracy against training count (log x), many/medium/few regions shaded."""
    fig = per_class_figure(metrics, train_counts, groups, title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())


def per_class_figure(metrics, train_counts, groups, title=None):
    """The matplotlib Figure plot_per_class_accuracy saves."""
    # Figure + Agg canvas directly: no pyplot, so no global backend state and no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    accs = metrics["per_class_acc"]
    _check_lengths(len(accs), train_counts=train_counts, groups=groups)
    # A class with no training image cannot sit on a log axis; draw it at 0.5.
    counts = [max(float(c), 0.5) for c in train_counts]
    fig = Figure(figsize=(8, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xscale("log")
    xlim = (min(counts) / 1.5, max(counts) * 1.5)
    spans = _group_spans(counts, groups, xlim)
    for name in GROUP_NAMES:
        if name in spans:
            _draw_group(ax, name, spans[name], counts, accs, groups, metrics)
        else:  # an empty group still gets its legend line, reported as empty
            ax.scatter([], [], s=10, color=_GROUP_COLORS[name], label=f"{name}: 0 classes, {EMPTY}")
    _style_axes(ax, xlim, title or _default_title(metrics))
    fig.tight_layout()
    return fig


def _style_axes(ax, xlim, title):
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    ax.set_xlim(*xlim)
    # Plain 1-2-5 tick labels read better than powers of ten for image counts.
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(-3, 103)
    ax.set_xlabel("training images per class (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    # below the axes, not on them: inside, the legend hides the points of whichever group sits in its corner
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8, frameon=False)


def _draw_group(ax, name, span, counts, accs, groups, metrics):
    lo, hi = span
    color = _GROUP_COLORS[name]
    points = [(x, a) for x, a, g in zip(counts, accs, groups) if g == name and a is not None]
    group_acc = metrics.get(f"{name}_acc")
    accuracy = EMPTY if group_acc is None else f"{group_acc:.1f}%"
    label = f"{name}: {metrics.get(f'{name}_classes', len(points))} classes, {accuracy}"
    # The legend entry goes on the points, or on the shading when no class has test samples.
    ax.axvspan(lo, hi, color=color, alpha=0.12, linewidth=0, label=None if points else label)
    if points:
        xs, ys = zip(*points)
        ax.scatter(xs, ys, s=10, color=color, alpha=0.7, label=label)
    if group_acc is not None:
        ax.hlines(group_acc, lo, hi, colors=color, linestyles="--", linewidth=1.2)


def _group_spans(counts, groups, xlim):
    """x-range per group: its counts, widened to the geometric midpoint of neighbouring groups.

    Groups need not be contiguous in count (e.g. LIFT's rho=100 groups on a rho=10 split); then the
    spans keep their raw extent and may overlap.
    """
    extents = {}
    for name in GROUP_NAMES:
        xs = [x for x, g in zip(counts, groups) if g == name]
        if xs:
            extents[name] = [min(xs), max(xs)]
    ordered = sorted(extents, key=lambda name: extents[name][0])
    for lower, upper in zip(ordered, ordered[1:]):
        if extents[lower][1] < extents[upper][0]:
            edge = math.sqrt(extents[lower][1] * extents[upper][0])
            extents[lower][1] = extents[upper][0] = edge
    if ordered:
        extents[ordered[0]][0] = min(extents[ordered[0]][0], xlim[0])
        extents[ordered[-1]][1] = max(extents[ordered[-1]][1], xlim[1])
    return {name: tuple(extents[name]) for name in ordered}


def _default_title(metrics):
    return (
        f"per-class accuracy (top-1 {_fmt(metrics.get('accuracy'), 2)}, "
        f"mean-class {_fmt(metrics.get('mean_class_acc'), 2)})"
    )


def _fmt(value, digits):
    return EMPTY if value is None else f"{value:.{digits}f}"


def _escape(text):
    return text.replace("|", "\\|")


def _check_lengths(num_classes, **lists):
    for name, values in lists.items():
        require(
            len(values) == num_classes, f"{name} has {len(values)} entries but the metrics have {num_classes} classes"
        )


