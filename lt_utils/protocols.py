"""`--protocol`: which tested model of a run is the number a paper reports (the run's `paper_row`).

The papers report different quantities: LIFT the final epoch, LOS the epoch with the best *test* accuracy, LT-Soups
the raw and the EMA model, each selected on val. A run tests its exports (`best/`, `final/`, and what the protocol
adds) and names the row to compare with the paper in all_results.json and its summary table.
"""
from dataclasses import dataclass

from .registry import Registry

PROTOCOLS = Registry("protocol", flag="--protocol")


@dataclass(frozen=True)
class Protocol:
    paper_row: str  # the all_results.json row a paper's number compares with (final/ when the run has no such row)
    what: str  # one line for --help and the summary table
    raw_exports: bool = False  # with an EMA: also keep and test the raw weights selected on val (best_raw/)
    test_each_eval: bool = False  # test at every validation and report the best test score (row best_test)


PROTOCOLS.register("best_val", Protocol("best", "best/ on validation (model selection never sees test)"))
PROTOCOLS.register("final", Protocol("final", "the final model (LIFT)"))
PROTOCOLS.register("best_test", Protocol(
    "best_test", "the best test score over validations (LOS); optimistic: test picks the model, best/ is the honest row",
    test_each_eval=True))
PROTOCOLS.register("ema_and_raw_val", Protocol(
    "best", "the EMA and the raw model, each best on validation (LT-Soups): best/ and best_raw/ (no EMA: best/ alone)",
    raw_exports=True))

# every export a run may write and test, in all_results.json's row order
RUN_ROWS = ("best", "final", "best_raw", "best_test")
OPTIMISTIC_ROWS = ("best_test",)  # selected on test: labelled so wherever shown


def paper_row(protocol, rows):
    """The row of `rows` (all_results.json's names) a paper's number compares with."""
    row = PROTOCOLS.get(protocol).paper_row
    return row if row in rows else "final"


def row_label(name, protocol, rows, step=None):
    """A summary-table row's name: `best (step 40, test)`, `best_test (step 20, test, optimistic)`, `final (test)`,
    `... [paper]` on the paper's row."""
    label = f"{name} ({f'step {step}, ' if step is not None else ''}test{', optimistic' if name in OPTIMISTIC_ROWS else ''})"
    return label + (" [paper]" if name == paper_row(protocol, rows) else "")
