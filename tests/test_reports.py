"""Reports: markdown table, per-class CSV, per-class accuracy PNG."""
import csv

import pytest
from PIL import Image

from lt_utils.errors import UserError
from lt_utils.metrics import compute_lt_metrics, groups_from_counts
from lt_utils.reports import EMPTY, format_markdown_table, per_class_figure, plot_per_class_accuracy, write_per_class_csv

# 4 classes; class 3 has no test sample. Per class: 2/2, 1/2, 0/1, none.
TRAIN_COUNTS = [300, 150, 40, 5]
GROUPS = groups_from_counts(TRAIN_COUNTS)  # many, many, medium, few
CLASS_NAMES = ["cat", "dog, large", "eel", "fox"]


def sample_metrics():
    return compute_lt_metrics([0, 0, 1, 0, 0], [0, 0, 1, 1, 2], 4, GROUPS)


def table_rows(table):
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table.strip().splitlines()]


def test_markdown_table_one_row_per_run_and_dash_for_empty_groups():
    metrics = sample_metrics()
    assert metrics["few_acc"] is None  # the few class has no test sample
    table = format_markdown_table({"run_a": metrics, "run|b": {**metrics, "accuracy": 12.345, "nll": 0.5}})
    rows = table_rows(table)
    assert rows[0] == ["run", "top-1", "mean-class", "many", "medium", "few", "macro-F1", "worst", "NLL"]
    assert rows[1][0] == "---" and len(rows) == 4
    assert rows[2] == ["run_a", "60.00", "50.00", "75.00", "0.00", EMPTY, "44.44", "0.00", EMPTY]
    # A "|" in a run name is escaped so the row keeps its columns.
    assert table.splitlines()[3].startswith("| run\\|b | 12.35 | 50.00 |")
    assert table.splitlines()[3].endswith("| 0.5000 |")


def test_per_class_csv_contents(tmp_path):
    path = tmp_path / "out" / "per_class.csv"
    write_per_class_csv(path, sample_metrics(), CLASS_NAMES, TRAIN_COUNTS, GROUPS)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [
        ["class_id", "class_name", "train_count", "group", "test_samples", "accuracy"],
        ["0", "cat", "300", "many", "2", "100.0000"],
        ["1", "dog, large", "150", "many", "2", "50.0000"],
        ["2", "eel", "40", "medium", "1", "0.0000"],
        ["3", "fox", "5", "few", "0", ""],
    ]
    assert sorted(p.name for p in path.parent.iterdir()) == ["per_class.csv"]  # no temp file left


def test_per_class_csv_rejects_mismatched_lengths(tmp_path):
    with pytest.raises(UserError, match="class_names has 3 entries but the metrics have 4 classes"):
        write_per_class_csv(tmp_path / "x.csv", sample_metrics(), CLASS_NAMES[:3], TRAIN_COUNTS, GROUPS)
    assert not (tmp_path / "x.csv").exists()


def test_plot_is_a_valid_png(tmp_path):
    counts = [int(500 * (1 / 100) ** (i / 99)) for i in range(100)]
    groups = groups_from_counts(counts)
    labels = [c for c in range(100) for _ in range(3)]
    preds = [c if i % 3 else (c + 1) % 100 for i, c in enumerate(labels)]
    path = tmp_path / "plots" / "per_class_accuracy.png"
    plot_per_class_accuracy(path, compute_lt_metrics(preds, labels, 100, groups), counts, groups, title="demo")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size == (960, 540)  # 8 x 4.5 inches at 120 dpi
    assert sorted(p.name for p in path.parent.iterdir()) == ["per_class_accuracy.png"]


def test_plot_handles_empty_group_missing_samples_and_zero_counts(tmp_path):
    # No "medium" class at all, a class with no test sample, and a class with 0 training images.
    counts, groups = [400, 0, 3], ["many", "few", "few"]
    metrics = compute_lt_metrics([0, 1], [0, 1], 3, groups)
    path = tmp_path / "p.png"
    plot_per_class_accuracy(path, metrics, counts, groups)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (960, 540)
    with pytest.raises(UserError, match="groups has 2 entries"):
        plot_per_class_accuracy(tmp_path / "q.png", metrics, counts, groups[:2])


def test_plot_legend_hides_no_point():
    counts = [int(500 * (1 / 100) ** (i / 99)) for i in range(100)]
    groups = groups_from_counts(counts)
    labels = [c for c in range(100) for _ in range(3)]
    wrong = [(c + 1) % 100 for c in labels]  # 0% everywhere: points along the bottom, where the legend used to sit
    fig = per_class_figure(compute_lt_metrics(wrong, labels, 100, groups), counts, groups)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    assert not legend.overlaps(ax.get_window_extent(renderer)) and fig.bbox.contains(legend.x0, legend.y0) \
        and fig.bbox.contains(legend.x1, legend.y1)
    from matplotlib.collections import PathCollection

    points = [xy for c in ax.collections if isinstance(c, PathCollection)  # the scatters, not the group means' lines
              for xy in c.get_offset_transform().transform(c.get_offsets())]
    assert len(points) == 100 and not any(legend.contains(x, y) for x, y in points)
    assert [t.get_text().split(":")[0] for t in ax.get_legend().get_texts()] == ["many", "medium", "few"]
