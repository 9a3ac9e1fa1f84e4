"""Class-capped subsets of an LT train set (LT-Soups' ingredient data)."""
import numpy as np

from ..errors import UserError


def capped_subset(train_ds, train_counts, balance_factor, seed=0):
    """Cap every class at floor(n_min * balance_factor) images, drawn per class (label order) with
    `np.random.default_rng(seed)`; classes below the cap keep all. Returns (subset Dataset, counts)."""
    if balance_factor < 1:
        raise UserError(f"balance_factor={balance_factor}: must be >= 1 (1 gives a balanced subset)")
    labels = np.asarray(train_ds["label"])
    actual = np.bincount(labels, minlength=len(train_counts))
    if len(actual) != len(train_counts) or list(actual) != list(train_counts):
        raise UserError("train_counts do not match the labels of train_ds; pass the LTInfo of this train split")
    cap = int(min(train_counts) * balance_factor)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(len(train_counts)):
        idx = np.flatnonzero(labels == c)
        chosen.append(np.sort(rng.permutation(idx)[:cap]) if len(idx) > cap else idx)
    indices = np.sort(np.concatenate(chosen))
    return train_ds.select(indices), [int(min(n, cap)) for n in train_counts]
