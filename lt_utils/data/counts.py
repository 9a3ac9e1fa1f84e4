"""Per-class train counts of an LT split, many/medium/few groups, and which source images fill each class."""
import numpy as np

from ..axes import SELECTION_MODES
from ..errors import UserError

GROUPS = ("many", "medium", "few")


def lt_counts(n_max, imb, num_classes):
    """n_i = floor(n_max * imb**(-i/(C-1))) for class i in label order.

    Written as `n_max * (1/imb)**(i/(C-1))`, the float expression all three reference repositories
    use, so boundary cases round exactly as theirs do.
    """
    if imb < 1:
        raise UserError(f"imb={imb:g}: the imbalance ratio must be >= 1 (n_max / n_min); pass e.g. --imb 100")
    if num_classes == 1:
        return [int(n_max)]
    return [int(n_max * (1.0 / imb) ** (i / (num_classes - 1.0))) for i in range(num_classes)]


def source_counts(order, max_per_class=None):
    """(counts, n_max) keeping each class's own images (a source already long-tailed, OLTR lists), capped at
    `max_per_class` when given."""
    n_max = max_per_class or max(len(o) for o in order)
    return [min(len(o), n_max) for o in order], n_max


def check_no_empty_class(counts, class_names, hint):
    """Every class must keep at least one training image."""
    for i, n in enumerate(counts):
        if n < 1:
            raise UserError(f"class {i} ({class_names[i]}) would get {n} training images; {hint}")


def group_of_count(count, many_threshold=100, few_threshold=20):
    if count > many_threshold:
        return "many"
    if count < few_threshold:
        return "few"
    return "medium"


def assign_groups(counts, many_threshold=100, few_threshold=20):
    if few_threshold > many_threshold:
        raise UserError(
            f"few_threshold={few_threshold} exceeds many_threshold={many_threshold}; pick few <= many (defaults 20, 100)"
        )
    return [group_of_count(n, many_threshold, few_threshold) for n in counts]


def indices_by_class(labels, num_classes):
    """Each class's source indices, ascending (one stable sort, not a pass over the labels per class)."""
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    bounds = np.cumsum(np.bincount(labels, minlength=num_classes))[:-1]
    return np.split(order, bounds)


def class_order(labels, num_classes, seed=0, selection="rng"):
    """Per-class source indices in the order they are drawn; an LT split keeps a prefix of each.

    - "rng": a `np.random.default_rng(seed)` permutation per class, classes in label order (LT-Soups).
    - "lift": LIFT's legacy draw, `np.random.seed(seed)` then `np.random.shuffle` per class in label
      order. A private `RandomState(seed)` yields the same stream without touching the global RNG.
    - "first": source order, no shuffle (LOS).
    """
    per_class = indices_by_class(labels, num_classes)
    if selection == "first":
        return per_class
    if selection == "rng":
        rng = np.random.default_rng(seed)
        return [rng.permutation(idx) for idx in per_class]
    if selection == "lift":
        state = np.random.RandomState(seed)
        for idx in per_class:
            state.shuffle(idx)
        return per_class
    raise UserError(f"selection={selection!r} is not a selection mode; use one of {', '.join(SELECTION_MODES)}")


def take_lt(order, counts, class_names, extra=0):
    """Split each class's drawn order into (train = first n_i, rest = up to `extra` of what follows)."""
    train, rest = [], []
    for c, (idx, n) in enumerate(zip(order, counts)):
        if len(idx) < n:
            raise UserError(
                f"class {c} ({class_names[c]}) has {len(idx)} source images but the split needs {n}; "
                "lower --max_per_class"
            )
        train.append(idx[:n])
        rest.append(idx[n : n + extra])
    return train, rest


def flat_sorted(per_class):
    """One index array in source order (the order the split is written in)."""
    if not per_class:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate([np.asarray(p, dtype=np.int64) for p in per_class]))
