#!/usr/bin/env python
"""Build a long-tailed (LT) split with its per-class counts and many/medium/few groups, print a summary,
and save it (`--output_dir`) and/or push it (`--push_to_hub`).

    # offline quick start (Debian's Fashion-MNIST IDX files)
    python data_scripts/build_lt.py --dataset fashion_mnist --imb 100 --max_per_class 600 --output_dir data/fmnist_lt100
    # CIFAR-100-LT, ρ=100, from the Hub or a local cifar-100-python/ (LIFT's image choice)
    python data_scripts/build_lt.py --dataset cifar100 --imb 100 --selection lift --output_dir data/cifar100_lt100
    # the builder's named preset (the same split as the first line)
    python data_scripts/build_lt.py --dataset fashion_mnist --dataset_config_name quickstart --output_dir data/fmnist_q
    # push to the Hub; train on it with --dataset you/fmnist-lt100
    python data_scripts/build_lt.py --dataset fashion_mnist --imb 100 --max_per_class 600 --push_to_hub you/fmnist-lt100
    # ImageNet-LT from the OLTR lists
    python data_scripts/build_lt.py --dataset imagenet_lt --data_dir /data/imagenet \\
        --train_list ImageNet_LT_train.txt --val_list ImageNet_LT_val.txt --test_list ImageNet_LT_test.txt \\
        --class_names_file classnames.txt --output_dir data/imagenet_lt
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lt_utils.data import DATASET_NAMES, load_lt_dataset, save_lt_to_disk  # noqa: E402
from lt_utils.data.counts import SELECTION_MODES  # noqa: E402
from lt_utils.data.hub import push_lt_dataset  # noqa: E402
from lt_utils.data.loading import VAL_SOURCES  # noqa: E402
from lt_utils.errors import UserError, cli_entry  # noqa: E402

BAR_WIDTH = 40
MAX_BARS = 20


def get_args_parser():
    p = argparse.ArgumentParser(description="Build a long-tailed dataset split.", add_help=False)
    g = p.add_argument_group("Dataset")
    g.add_argument("--dataset", required=True, help=f"one of {', '.join(DATASET_NAMES)} (or the short form, e.g. cifar100)")
    g.add_argument("--dataset_config_name", default=None,
                   help="a named preset of the builder (fashion_mnist_lt: quickstart = imb 100, n_max 600; imb100, imb50, imb10)")
    g.add_argument("--imb", type=float, default=100.0, help="imbalance ratio ρ = n_max / n_min (>= 1)")
    g.add_argument("--max_per_class", type=int, default=None, help="n_max; default: the source's per-class maximum")
    g.add_argument("--data_dir", default=None, help="local source; default: the Hub (fashion_mnist: Debian's IDX dir)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--selection", choices=SELECTION_MODES, default="rng", help="which images fill each class")
    g.add_argument("--val_per_class", type=int, default=20)
    g.add_argument("--val_source", choices=VAL_SOURCES, default="unused_train")
    g.add_argument("--cache_dir", default=None, help="`datasets` cache root")
    g = p.add_argument_group("OLTR lists (imagenet_lt, places_lt, inat2018)")
    g.add_argument("--train_list", default=None)
    g.add_argument("--val_list", default=None)
    g.add_argument("--test_list", default=None)
    g.add_argument("--class_names_file", default=None)
    g.add_argument("--relabel_by_name", action="store_true", help="class ids by sorted class name (LIFT's iNat order)")
    g = p.add_argument_group("Image folder (imagefolder_lt)")
    g.add_argument("--test_dir", default=None)
    g.add_argument("--val_dir", default=None)
    g.add_argument("--test_per_class", type=int, default=50, help="held-out test images per class without --test_dir")
    g = p.add_argument_group("Groups")
    g.add_argument("--many_threshold", type=int, default=100, help="many: more than this many train images")
    g.add_argument("--few_threshold", type=int, default=20, help="few: fewer than this many train images")
    g = p.add_argument_group("Output")
    g.add_argument("--output_dir", default=None, help="save_to_disk target (written atomically)")
    g.add_argument("--overwrite", action="store_true")
    g.add_argument("--push_to_hub", metavar="REPO", default=None, help="also push the split to this Hub dataset repo")
    return p


def parse_args(argv=None):
    parser = argparse.ArgumentParser(parents=[get_args_parser()])
    return parser.parse_args(argv)


def histogram(info):
    """One bar per class (label order) for <= 20 classes; else classes ranked by count, in 20 buckets."""
    counts, names = info.train_counts, info.class_names
    top = max(counts)
    bar = lambda n: "#" * max(1, round(BAR_WIDTH * n / top))  # noqa: E731
    if len(counts) <= MAX_BARS:
        width = max(len(n) for n in names)
        return [f"  {i:>3} {names[i]:<{width}} {n:>6} {bar(n)}" for i, n in enumerate(counts)]
    ranked = sorted(counts, reverse=True)
    edges = [round(k * len(ranked) / MAX_BARS) for k in range(MAX_BARS + 1)]
    lines = ["  ranks        counts (max..min)  mean"]
    for lo, hi in zip(edges, edges[1:]):
        chunk = ranked[lo:hi]
        mean = sum(chunk) / len(chunk)
        lines.append(f"  {lo:>5}-{hi - 1:<5} {chunk[0]:>7}..{chunk[-1]:<7} {mean:>7.1f} {bar(mean)}")
    return lines


def summary(ds, info):
    counts, names = info.train_counts, info.class_names
    head, tail = counts.index(max(counts)), counts.index(min(counts))
    groups = info.group_counts()
    return "\n".join([
        f"{info.dataset} from {info.source}: imb {info.imb:g}, n_max {info.max_per_class}, "
        f"selection {info.selection}, seed {info.seed}, val {info.val_source}",
        "splits: " + " | ".join(f"{s} {ds[s].num_rows:,}" for s in ds),
        f"classes: {len(counts)}; head {counts[head]} ({names[head]}), tail {counts[tail]} ({names[tail]})",
        f"groups (many >{info.many_threshold}, few <{info.few_threshold}): "
        + " | ".join(f"{g} {n}" for g, n in groups.items()),
        "train images per class:",
        *histogram(info),
    ])


def push_to_hub(ds, info, repo):
    try:
        push_lt_dataset(ds, info, repo)
    except Exception as err:  # network, auth, repo name: all for the user to fix
        raise UserError(f"pushing the split to {repo} failed ({type(err).__name__}); check HF_TOKEN and the repo id, "
                        "then run again with --push_to_hub") from None


@cli_entry
def main(argv=None):
    args = parse_args(argv)
    if args.output_dir and os.path.exists(args.output_dir) and not args.overwrite:
        raise UserError(f"{args.output_dir} already exists; choose another --output_dir or pass --overwrite")
    ds, info = load_lt_dataset(
        args.dataset, imb=args.imb, data_dir=args.data_dir, max_per_class=args.max_per_class, seed=args.seed,
        selection=args.selection, val_per_class=args.val_per_class, val_source=args.val_source,
        train_list=args.train_list, val_list=args.val_list, test_list=args.test_list,
        class_names_file=args.class_names_file, many_threshold=args.many_threshold,
        few_threshold=args.few_threshold, cache_dir=args.cache_dir, test_dir=args.test_dir, val_dir=args.val_dir,
        test_per_class=args.test_per_class, relabel_by_name=args.relabel_by_name, config_name=args.dataset_config_name,
    )
    print(summary(ds, info))
    if args.output_dir:
        save_lt_to_disk(ds, info, args.output_dir, overwrite=args.overwrite)
        print(f"saved to {args.output_dir}")
    if args.push_to_hub:
        push_to_hub(ds, info, args.push_to_hub)
        print(f"pushed to https://huggingface.co/datasets/{args.push_to_hub}")


if __name__ == "__main__":
    main()
