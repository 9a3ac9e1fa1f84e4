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
    # any `datasets` image-classification dataset (a Hub id or a local folder), e.g. Food-101-LT at rho 100
    python data_scripts/build_lt.py --dataset_name food101 --test_split validation --imb 100 --output_dir data/food101_lt
    # ImageNet-LT from the OLTR lists
    python data_scripts/build_lt.py --dataset imagenet_lt --data_dir /data/imagenet \\
        --train_list ImageNet_LT_train.txt --val_list ImageNet_LT_val.txt --test_list ImageNet_LT_test.txt \\
        --class_names_file classnames.txt --output_dir data/imagenet_lt
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# lt_utils.data (datasets, pyarrow) is imported once the flags are parsed: --help answers without it
from lt_utils.config import DATA_INPUT_FLAGS, HF_SOURCE_FLAGS, ArgumentParser, add_group, resolve_cross_flags  # noqa: E402
from lt_utils.paths import check_output, check_outputs_apart  # noqa: E402
from lt_utils.errors import UserError, cli_entry, require  # noqa: E402

BAR_WIDTH = 40
MAX_BARS = 20


def get_args_parser():
    p = ArgumentParser(description="Build a long-tailed dataset split.")
    add_group(p, "Dataset", ("dataset", "dataset_config_name", "imb", "max_per_class", "data_dir", "seed", "selection",
                             "val_per_class", "val_source", "train_val_split", "cache_dir"), dataset=None)
    add_group(p, "OLTR lists (imagenet_lt, places_lt, inat2018)", ("train_list", "val_list", "test_list",
                                                                   "class_names_file", "relabel_by_name"))
    add_group(p, "Any `datasets` dataset (--dataset_name: a Hub id or a local folder)", (
        "dataset_name", "dataset_revision", "train_split", "validation_split", "test_split", "image_column_name",
        "label_column_name", "max_train_samples", "trust_remote_code"))
    add_group(p, "Image folder (imagefolder_lt; held-out test of hf_lt)", ("test_dir", "val_dir", "test_per_class"))
    add_group(p, "Groups", ("many_threshold", "few_threshold"))
    add_group(p, "Output", ("output_dir", "overwrite", "push_to_hub"), dest={"push_to_hub": "push_to_hub_repo"},
              output_dir=None)
    return p


def parse_args(argv=None):
    args = argparse.Namespace(**resolve_cross_flags(vars(get_args_parser().parse_args(argv))))
    from lt_utils.data import DATASET_NAMES

    require(args.dataset is not None, f"--dataset or --dataset_name is required; pass one of {', '.join(DATASET_NAMES)} "
                                      "(or the short form, e.g. cifar100), or --dataset_name with a `datasets` dataset")
    # train_lt.py also passes it to the model; here only a `datasets` source's code could run
    require(not args.trust_remote_code or args.dataset_name is not None,
            f"--trust_remote_code applies to a --dataset_name source, not to --dataset {args.dataset}; drop it")
    return args


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
        f"{info.dataset} from {info.source}: imb {info.imb_text}, n_max {info.max_per_class}, "
        f"selection {info.selection}, seed {info.seed}, val {info.val_source}",
        "splits: " + " | ".join(f"{s} {ds[s].num_rows:,}" for s in ds),
        f"classes: {len(counts)}; head {counts[head]} ({names[head]}), tail {counts[tail]} ({names[tail]})",
        f"groups (many >{info.many_threshold}, few <{info.few_threshold}): "
        + " | ".join(f"{g} {n}" for g, n in groups.items()),
        "train images per class:",
        *histogram(info),
    ])


def push_to_hub(ds, info, repo):
    from lt_utils.data.hub import push_lt_dataset

    try:
        push_lt_dataset(ds, info, repo)
    except Exception as err:  # network, auth, repo name: all for the user to fix
        raise UserError(f"pushing the split to {repo} failed ({type(err).__name__}); check HF_TOKEN and the repo id, "
                        "then run again with --push_to_hub") from None


@cli_entry
def main(argv=None):
    args = parse_args(argv)
    if args.push_to_hub:  # the Hub, the token and the dataset repo before the (long) build
        from lt_utils.hub import check_hub_push

        check_hub_push(args.push_to_hub, repo_type="dataset", flag="--push_to_hub")
    if args.cache_dir:
        check_output(args.cache_dir, "--cache_dir", lock=False)
    if args.output_dir:  # checked before the (long) build; the source is never written into or replaced
        check_outputs_apart({"--output_dir": args.output_dir},
                            {f"--{flag}": getattr(args, flag, None) for flag in DATA_INPUT_FLAGS})
        check_output(args.output_dir, "--output_dir")
        if os.path.exists(args.output_dir) and not args.overwrite:
            raise UserError(f"{args.output_dir} already exists; choose another --output_dir or pass --overwrite")
    from lt_utils.data import load_lt_dataset, save_lt_to_disk

    ds, info = load_lt_dataset(
        args.dataset, imb=args.imb, data_dir=args.data_dir, max_per_class=args.max_per_class, seed=args.seed,
        selection=args.selection, val_per_class=args.val_per_class, val_source=args.val_source,
        train_list=args.train_list, val_list=args.val_list, test_list=args.test_list,
        class_names_file=args.class_names_file, many_threshold=args.many_threshold,
        few_threshold=args.few_threshold, cache_dir=args.cache_dir, test_dir=args.test_dir, val_dir=args.val_dir,
        test_per_class=args.test_per_class, relabel_by_name=args.relabel_by_name, config_name=args.dataset_config_name,
        train_val_split=args.train_val_split,
        **{flag: getattr(args, flag) for flag in HF_SOURCE_FLAGS if flag not in ("class_names_file", "dataset_config_name")},
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
