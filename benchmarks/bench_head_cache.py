"""Head-only training (LOS / LT-Soups stage 2, `train_lt.py --method head`): cached features vs the backbone every epoch.

  python benchmarks/bench_head_cache.py                      # Fashion-MNIST-LT (Debian IDX), tiny ViT, N = 1, 5, 20
  python benchmarks/bench_head_cache.py --repeats 5 --threads 2    # torch's thread pool on an idle machine

cached: what train_lt.py does. `training.cache_features` runs the frozen backbone once over the train split
  (eval transform), then every epoch trains the head on `training.feature_loader` batches.
naive:  the frozen backbone runs inside every training step, every epoch (decode, transform, forward under
  no_grad in eval mode, then the head), as a stage-2 loop that does not cache would do.

Both use the same prepared loaders' seeded order, head init, AdamW, constant learning rate, `build_loss("la")` and
`engine.train_one_epoch`, with no augmentation, so after N epochs they must hold the same head (up to float rounding
of features computed in other batch compositions). One 20-epoch run per path and repeat; the time after epoch N is
the time of an N-epoch run (constant lr), the cached one including the caching pass.
"""
import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

from _common import REPO, clock, machine, median, ratio, set_threads, write_results

DEFAULT_MODEL = REPO / "configs" / "models" / "vit_tiny_fmnist"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_name_or_path", default=str(DEFAULT_MODEL))
    p.add_argument("--from_scratch", default="true", choices=("true", "false"),
                   help="seeded random backbone from the config (the default tiny ViT has no weights)")
    p.add_argument("--dataset", default="fashion_mnist_lt")
    p.add_argument("--data_dir", default=None, help="default: Debian's /usr/share/datasets/fashion-mnist")
    p.add_argument("--imb", type=float, default=100)
    p.add_argument("--max_per_class", type=int, default=600)
    p.add_argument("--cache_dir", default=None, help="datasets cache (default: a temporary dir)")
    p.add_argument("--epochs", default="1,5,20", help="report after these epochs (comma-separated)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--per_device_train_batch_size", type=int, default=128)
    p.add_argument("--per_device_eval_batch_size", type=int, default=256)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--head_type", default="cosine", choices=("cosine", "linear"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (0: torch's default); 1 keeps a shared machine from stalling torch's thread pool")
    p.add_argument("--results_name", default="head_cache")
    return p.parse_args(argv)


class FrozenBackboneHead(nn.Module):
    """The naive stage-2 model: every forward runs the frozen backbone (eval mode, no graph), then the head."""

    def __init__(self, lt_model):
        super().__init__()
        self.lt_model = lt_model
        self.head = lt_model.head

    def forward(self, pixel_values):
        self.lt_model.backbone.eval()  # train_one_epoch calls .train(); a frozen backbone stays in eval mode
        with torch.no_grad():
            features = self.lt_model.features(pixel_values)
        return self.head(features)


def load_train_split(args, cache_dir):
    from lt_utils.data import load_lt_dataset

    ds, info = load_lt_dataset(args.dataset, imb=args.imb, data_dir=args.data_dir, max_per_class=args.max_per_class,
                               seed=args.seed, cache_dir=cache_dir)
    return ds["train"], info


def build_frozen_model(args, info):
    """A `--method head` LTModel (backbone frozen) and a seeded head init both paths start from."""
    from lt_utils.heads import random_head_init
    from lt_utils.models import build_lt_model
    from lt_utils.peft_methods import apply_method

    lt_model = build_lt_model(args.model_name_or_path, len(info.class_names), head_type=args.head_type,
                              from_scratch=args.from_scratch == "true", seed=args.seed)
    head_init = random_head_init(len(info.class_names), lt_model.spec.hidden_size, seed=args.seed)
    return apply_method(lt_model, "head"), head_init


def train_epochs(accelerator, model, loader, loss_fn, lr, marks, start):
    """Train for max(marks) epochs; returns {N: (seconds since `start`, head weight)} after each epoch N in marks."""
    from lt_utils.engine import TrainState, train_one_epoch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state, out = TrainState(), {}
    for epoch in range(max(marks)):
        loader.set_epoch(epoch)
        train_one_epoch(model, loader, optimizer, loss_fn, accelerator, state, lambda step: lr)
        if epoch + 1 in marks:
            out[epoch + 1] = (clock() - start, accelerator.unwrap_model(model).head.weight.detach().cpu().clone())
    return out


class HeadOnly(nn.Module):
    """The cached path's model: the head alone (as train_lt.py trains `lt_model.head`), under the naive one's names."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, features):
        return self.head(features)


def run_cached(args, accelerator, lt_model, train_ds, eval_tf, loss_fn, marks):
    from lt_utils import data_loaders as T

    start = clock()
    images = accelerator.prepare(T.image_loader(train_ds, eval_tf, args.per_device_eval_batch_size, 0))
    features = T.cache_features(lt_model, images, accelerator, "features train")
    cache_seconds = clock() - start
    torch.manual_seed(args.seed)  # the prepared loader's seedable sampler takes its seed from here
    loader = T.feature_loader(features, args.per_device_train_batch_size, shuffle=True)
    return train_epochs(accelerator, HeadOnly(lt_model.head), loader, loss_fn, args.learning_rate, marks, start), cache_seconds


def run_naive(args, accelerator, lt_model, train_ds, transform, loss_fn, marks):
    """The frozen backbone inside every step: over the eval view (naive), or over seeded augmented views (augmented,
    `--head_features augmented`: the papers' stage 2)."""
    from lt_utils import data_loaders as T

    start = clock()
    torch.manual_seed(args.seed)
    loader = T.image_loader(train_ds, transform, args.per_device_train_batch_size, 0, shuffle=True)
    return train_epochs(accelerator, FrozenBackboneHead(lt_model), loader, loss_fn, args.learning_rate, marks, start)


def one_repeat(args, accelerator, lt_model, head_init, train_ds, eval_tf, loss_fn, marks, naive_first, train_tf=None):
    """The paths from the same head init; {"cache_seconds", "N": {times, head diff}} for each N in marks. With
    `train_tf` (a SeededAugment) the augmented path is timed too."""
    from lt_utils.head_init import set_head_weight

    paths, cache_seconds = {}, None
    # alternate which path goes first, so a drift in machine load does not favour one of them
    names = ["naive", "cached"] + (["augmented"] if train_tf is not None else [])
    for name in names if naive_first else names[::-1]:
        set_head_weight(lt_model, head_init)
        if name == "cached":
            paths[name], cache_seconds = run_cached(args, accelerator, lt_model, train_ds, eval_tf, loss_fn, marks)
        else:
            tf = eval_tf if name == "naive" else train_tf
            paths[name] = run_naive(args, accelerator, lt_model, train_ds, tf, loss_fn, marks)
    out = {"cache_seconds": cache_seconds}
    for n in marks:
        (naive_s, naive_head), (cached_s, cached_head) = paths["naive"][n], paths["cached"][n]
        out[str(n)] = {"naive_s": naive_s, "cached_s": cached_s,
                       "max_abs_head_diff": (naive_head - cached_head).abs().max().item(),
                       # the size of what training changed, so a zero diff above is not a head that never moved
                       "max_abs_head_update": (naive_head - head_init).abs().max().item()}
        if "augmented" in paths:
            out[str(n)]["augmented_s"] = paths["augmented"][n][0]
    return out


def main(argv=None):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from lt_utils import data_loaders as T
    from lt_utils.losses import build_loss

    args = parse_args(argv)
    set_threads(args.threads)
    marks = sorted({int(n) for n in args.epochs.split(",")})
    with tempfile.TemporaryDirectory(prefix="bench_head_cache_") as tmp:
        train_ds, info = load_train_split(args, args.cache_dir or tmp)
        accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
        lt_model, head_init = build_frozen_model(args, info)
        lt_model.to(accelerator.device)
        eval_tf = T.image_transforms(lt_model.spec, augment="none")[1]
        loss_fn = build_loss("la", list(info.train_counts)).to(accelerator.device)
        runs = []
        for repeat in range(args.repeats):
            runs.append(one_repeat(args, accelerator, lt_model, head_init, train_ds, eval_tf, loss_fn, marks,
                                   naive_first=repeat % 2 == 0))
            print(f"repeat {repeat + 1}/{args.repeats}: " + "  ".join(
                f"N={n} naive {runs[-1][str(n)]['naive_s']:.2f}s cached {runs[-1][str(n)]['cached_s']:.2f}s" for n in marks))
    summary = summarize(runs, marks)
    report(summary, len(train_ds), lt_model.spec, args)
    path = write_results(args.results_name, {"setup": setup_record(args, len(train_ds), lt_model.spec, accelerator),
                                             "summary": summary, "runs": runs})
    print(f"wrote {path}")
    return summary


def setup_record(args, num_images, spec, accelerator):
    return {"dataset": args.dataset, "imb": args.imb, "max_per_class": args.max_per_class, "train_images": num_images,
            "model": shown_path(args.model_name_or_path), "from_scratch": args.from_scratch,
            "backbone": {**spec.to_dict(), "name_or_path": shown_path(spec.name_or_path)}, "head_type": args.head_type,
            "loss": "la", "train_batch": args.per_device_train_batch_size, "eval_batch": args.per_device_eval_batch_size,
            "learning_rate": args.learning_rate, "threads": args.threads, "repeats": args.repeats,
            "device": str(accelerator.device)}


def shown_path(name_or_path):
    """Repo-relative when inside the repo, so results files do not carry this machine's checkout path."""
    try:
        return str(Path(name_or_path).resolve().relative_to(REPO))
    except ValueError:
        return str(name_or_path)


def summarize(runs, marks):
    out = {"cache_seconds_median": median([r["cache_seconds"] for r in runs])}
    for n in marks:
        naive, cached = median([r[str(n)]["naive_s"] for r in runs]), median([r[str(n)]["cached_s"] for r in runs])
        out[str(n)] = {"naive_s_median": naive, "cached_s_median": cached,
                       "speedup_median": median([ratio(r[str(n)]["naive_s"], r[str(n)]["cached_s"]) for r in runs]),
                       "max_abs_head_diff": max(r[str(n)]["max_abs_head_diff"] for r in runs),
                       "max_abs_head_update": median([r[str(n)]["max_abs_head_update"] for r in runs])}
    return out


def report(summary, num_images, spec, args):
    print(f"\n{args.dataset} imb {args.imb:g}: {num_images} train images; backbone {spec.kind} D={spec.hidden_size} "
          f"L={spec.num_layers} {spec.image_size}px/{spec.patch_size}; {machine()}")
    print(f"caching pass (median): {summary['cache_seconds_median']:.2f}s")
    print("| epochs N | naive (backbone every epoch) s | cached (cache + head) s | speed-up | max abs head diff "
          "(head update) |")
    print("|---|---|---|---|---|")
    for n in sorted(int(k) for k in summary if k.isdigit()):
        s = summary[str(n)]
        print(f"| {n} | {s['naive_s_median']:.2f} | {s['cached_s_median']:.2f} | {s['speedup_median']:.1f}x | "
              f"{s['max_abs_head_diff']:.1e} ({s['max_abs_head_update']:.1e}) |")


if __name__ == "__main__":
    main()
