"""Many/medium/few metrics: `metrics.compute_lt_metrics` (bincounts) vs per-class Python loops, C = 100 .. 8,142.

  python benchmarks/bench_metrics.py                       # C = 100, 1000, 8142; N = 24,426 (iNat 2018 val size)
  python benchmarks/bench_metrics.py --classes 8142 --repeats 9

Baselines, all computing per-class accuracy, overall and mean-class accuracy and many/medium/few:
  meters_item   the reference repositories' evaluator: per sample, `label.item()` and `match.item()` appended to a
                per-class list, then one Python pass per class (the meter update every LT repo copies)
  meters_list   the same loops on `.tolist()` values (a generous Python baseline: no per-element tensor access)
  class_masks   one vectorised mask per class, `for c in range(C): preds[labels == c]`: O(N x C)
The vectorised function computes more than these (macro-F1, worst/harmonic/geometric class accuracy, input checks),
so its times are an upper bound for the same work. Every baseline's numbers are asserted equal to its output.
"""
import argparse
import math

import numpy as np
import torch

from _common import clock, machine, median, ratio, set_threads, write_results

GROUPS = ("many", "medium", "few")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", default="100,1000,8142", help="numbers of classes C (comma-separated)")
    p.add_argument("--num_samples", type=int, default=24_426, help="N predictions (iNat 2018 val: 24,426 = 3 x 8,142)")
    p.add_argument("--accuracy", type=float, default=0.7, help="fraction of predictions set to the true label")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (0: torch's default); 1 keeps a shared machine from stalling torch's thread pool")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results_name", default="metrics")
    return p.parse_args(argv)


def lt_problem(num_classes, num_samples, accuracy, seed):
    """(preds, labels, groups): exponential train profile 1000 -> 10 (many/medium/few all present), every class in
    the test labels (N spread as evenly as possible), `accuracy` of the predictions right."""
    from lt_utils.metrics import groups_from_counts

    rng = np.random.default_rng(seed)
    counts = [int(1000 * 100 ** (-i / max(1, num_classes - 1))) for i in range(num_classes)]
    labels = rng.permutation(np.arange(num_samples) % num_classes)
    preds = np.where(rng.random(num_samples) < accuracy, labels, rng.integers(0, num_classes, num_samples))
    return torch.from_numpy(preds), torch.from_numpy(labels), groups_from_counts(counts)


def summary_from_per_class(per_class, correct, total, groups):
    """overall, mean-class and group accuracies from per-class values, in plain Python (shared by the baselines)."""
    evaluated = [a for a in per_class if a is not None]
    out = {"accuracy": 100 * correct / total, "mean_class_acc": sum(evaluated) / len(evaluated), "per_class_acc": per_class}
    for name in GROUPS:
        accs = [a for a, g in zip(per_class, groups) if g == name and a is not None]
        out[f"{name}_acc"] = sum(accs) / len(accs) if accs else None
    return out


def meters_item(preds, labels, num_classes, groups):
    matches = preds.eq(labels).int()
    per_class_res = [[] for _ in range(num_classes)]
    for i, label in enumerate(labels):
        per_class_res[label.item()].append(int(matches[i].item()))
    per_class = [100 * sum(r) / len(r) if r else None for r in per_class_res]
    return summary_from_per_class(per_class, int(matches.sum()), len(labels), groups)


def meters_list(preds, labels, num_classes, groups):
    correct, total = [0] * num_classes, [0] * num_classes
    for p, y in zip(preds.tolist(), labels.tolist()):
        total[y] += 1
        correct[y] += p == y
    per_class = [100 * k / n if n else None for k, n in zip(correct, total)]
    return summary_from_per_class(per_class, sum(correct), len(labels), groups)


def class_masks(preds, labels, num_classes, groups):
    per_class, right = [], 0
    for c in range(num_classes):
        mask = labels == c
        n, k = int(mask.sum()), int((preds[mask] == c).sum())
        per_class.append(100 * k / n if n else None)
        right += k
    return summary_from_per_class(per_class, right, len(labels), groups)


BASELINES = {"meters_item": meters_item, "meters_list": meters_list, "class_masks": class_masks}


def vectorised(preds, labels, num_classes, groups):
    from lt_utils.metrics import compute_lt_metrics

    return compute_lt_metrics(preds, labels, num_classes, groups)


def check_same(expected, got, name):
    """Per-class accuracies exactly equal; means equal up to summation order (1e-12 relative)."""
    assert got["per_class_acc"] == expected["per_class_acc"], f"{name}: per-class accuracies differ"
    for key in ("accuracy", "mean_class_acc", *(f"{g}_acc" for g in GROUPS)):
        a, b = expected[key], got[key]
        assert (a is None and b is None) or math.isclose(a, b, rel_tol=1e-12), f"{name}: {key} {b} vs {a}"


def time_call(fn, args, repeats):
    times, result = [], None
    for _ in range(repeats):
        start = clock()
        result = fn(*args)
        times.append(clock() - start)
    return times, result


def bench_one(num_classes, args):
    preds, labels, groups = lt_problem(num_classes, args.num_samples, args.accuracy, args.seed)
    problem = (preds, labels, num_classes, groups)
    vectorised(*problem)  # warm-up: first-call imports and allocator
    times = {"vectorised": []}
    times.update({name: [] for name in BASELINES})
    reference = None
    for _ in range(args.repeats):  # interleaved, so load drift hits every method alike
        t, reference = time_call(vectorised, problem, 1)
        times["vectorised"] += t
        for name, fn in BASELINES.items():
            t, result = time_call(fn, problem, 1)
            times[name] += t
            check_same(reference, result, name)
    med = {name: median(t) for name, t in times.items()}
    row = {"num_classes": num_classes, "num_samples": args.num_samples, "groups": {g: groups.count(g) for g in GROUPS},
           "median_s": med, "times_s": times,
           "speedup_vs": {name: ratio(med[name], med["vectorised"]) for name in BASELINES},
           "equal_results": True}
    print(f"C={num_classes:>5}: vectorised {1e3 * med['vectorised']:.2f} ms; " + "; ".join(
        f"{name} {1e3 * med[name]:.1f} ms ({row['speedup_vs'][name]:.1f}x)" for name in BASELINES) + "; results equal")
    return row


def main(argv=None):
    args = parse_args(argv)
    set_threads(args.threads)
    rows = [bench_one(int(c), args) for c in args.classes.split(",")]
    print(f"\n{machine()}")
    print("| C | N | compute_lt_metrics ms | " + " | ".join(f"{n} ms (ratio)" for n in BASELINES) + " |")
    print("|---|---|---|" + "---|" * len(BASELINES))
    for r in rows:
        cells = " | ".join(f"{1e3 * r['median_s'][n]:.1f} ({r['speedup_vs'][n]:.1f}x)" for n in BASELINES)
        print(f"| {r['num_classes']:,} | {r['num_samples']:,} | {1e3 * r['median_s']['vectorised']:.2f} | {cells} |")
    path = write_results(args.results_name, {"setup": {"repeats": args.repeats, "accuracy": args.accuracy,
                                                       "seed": args.seed, "threads": args.threads}, "rows": rows})
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
