"""Class-capped subsets of an LT train set (LT-Soups' ingredient data)."""
import numpy as np

from ..errors import UserError

SUBSET_SELECTIONS = ("rng", "lt_soups")


def capped_subset(train_ds, train_counts, balance_factor, seed=0, selection="rng"):
    """Cap every class at floor(n_min * balance_factor) images; classes below the cap keep all.
    Returns (subset Dataset, counts).

    - "rng": per class (label order) a `np.random.default_rng(seed)` permutation of the class's images in
      split order; the first `cap` are kept. Classes at or below the cap draw nothing.
    - "lt_soups": LT-Soups' exact draw: one `default_rng(seed)`, and for every class in label order
      `rng.choice(images, min(cap, n), replace=False)` over the class's images in the order the LT split drew
      them (the `draw_rank` column), which is the order of LT-Soups' own train set. Every class draws, also
      those at or below the cap, as LT-Soups does, so the generator's stream stays in step.
    """
    if selection not in SUBSET_SELECTIONS:
        raise UserError(f"subset selection {selection!r} is not one of {', '.join(SUBSET_SELECTIONS)}")
    if balance_factor < 1:
        raise UserError(f"balance_factor={balance_factor}: must be >= 1 (1 gives a balanced subset)")
    labels = np.asarray(train_ds["label"])
    actual = np.bincount(labels, minlength=len(train_counts))
    if len(actual) != len(train_counts) or list(actual) != list(train_counts):
        raise UserError("train_counts do not match the labels of train_ds; pass the LTInfo of this train split")
    cap = int(min(train_counts) * balance_factor)
    rng = np.random.default_rng(seed)
    chosen = []
    if selection == "rng":
        for c in range(len(train_counts)):
            idx = np.flatnonzero(labels == c)
            chosen.append(np.sort(rng.permutation(idx)[:cap]) if len(idx) > cap else idx)
    else:
        if "draw_rank" not in train_ds.column_names:
            raise UserError("this train split has no draw_rank column (built by an older lt_utils); rebuild it with "
                            "data_scripts/build_lt.py or the dataset name, or use --subset_selection rng")
        ranks = np.asarray(train_ds["draw_rank"])
        for c in range(len(train_counts)):
            idx = np.flatnonzero(labels == c)
            in_draw_order = idx[np.argsort(ranks[idx], kind="stable")]
            chosen.append(rng.choice(in_draw_order, min(cap, len(idx)), replace=False))
    indices = np.sort(np.concatenate(chosen))
    return train_ds.select(indices), [int(min(n, cap)) for n in train_counts]
