"""Command-line flags (HF example vocabulary), yaml presets with CLI overrides, and the saved resolved config.

The choices of --method, --loss, --head_type, --head_init, --prompt_template and --tte are the registries' names.

A preset is a yaml mapping of flag names to values: `--config configs/lift_cifar100_lt.yaml --learning_rate 0.02`.
Unknown keys in a preset are an error, not silently ignored. Relative input paths inside a preset are found next to
the preset file, then in the repository (`resolve_preset_paths`); paths typed on the command line stay relative to
the working directory.
"""
import argparse
import os
from pathlib import Path

import yaml

from .compile import add_compile_args
from .errors import UserError
from .fileio import atomic_write_text
from .head_init import HEAD_INITS
from .heads import HEADS
from .losses import LOSSES
from .peft_methods import METHODS
from .prompts import PROMPT_MODES
from .transforms import TTE_MODES


def parse_args_with_config(parser, argv=None):
    """timm's two-pass trick: read `--config FILE` first, make its keys the defaults, then parse the rest."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**resolve_preset_paths(load_preset(known.config, parser), known.config))
    return parser.parse_args(argv)


def load_preset(path, parser):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found; pass an existing yaml file to --config (see configs/)")
    try:
        preset = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid yaml ({err.__class__.__name__}); fix its syntax") from None
    if not isinstance(preset, dict):
        raise UserError(f"config file {path} must be a mapping of flag names to values")
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(preset) - known)
    if unknown:
        raise UserError(f"config file {path} has unknown keys {unknown}; use the flag names of --help")
    return preset


# preset keys naming something to read (outputs such as output_dir and cache_dir stay relative to the working dir)
PRESET_INPUT_PATHS = ("model_name_or_path", "init_from", "dataset", "data_dir", "train_list", "val_list", "test_list",
                      "class_names_file", "test_dir", "val_dir")
REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_preset_paths(preset, preset_path):
    """Relative input paths of a preset, looked up next to the preset file, then at the repository root: the first
    that exists is made absolute, so a preset works from any working directory. A value found in neither place (a
    Hub id, a dataset name) is kept as written."""
    resolved = dict(preset)
    for key in PRESET_INPUT_PATHS:
        value = preset.get(key)
        if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
            continue
        for root in (Path(preset_path).resolve().parent, REPO_ROOT):
            if (root / value).exists():
                resolved[key] = str(root / value)
                break
    return resolved


def public_flags(values):
    """Flags as they may be recorded (config.yaml, trackers, logs, cards): secrets (`*_token`) are blanked, so a
    recorded config never carries a Hub token (re-used, it falls back to HF_TOKEN / huggingface-cli login)."""
    return {k: (None if k.endswith("_token") else v) for k, v in dict(values).items()}


def save_resolved_config(args, path):
    """The exact flags a run used (secrets blanked), re-usable as `--config`."""
    values = {k: v for k, v in public_flags(vars(args)).items() if k != "config"}
    atomic_write_text(path, yaml.safe_dump(values, sort_keys=True))


def str2bool(value):
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


# data flag -> the LTInfo field that records it: how an export or split tells which data it was built from
RECORDED_DATA_FLAGS = {"dataset": "dataset", "imb": "imb", "max_per_class": "max_per_class", "imb_seed": "seed",
                       "selection": "selection", "val_per_class": "val_per_class", "val_source": "val_source",
                       "many_threshold": "many_threshold", "few_threshold": "few_threshold"}


def add_data_args(parser):
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="fashion_mnist_lt",
                   help="cifar100_lt, cifar10_lt, fashion_mnist_lt, imagenet_lt, places_lt, inat2018, imagefolder_lt, "
                        "a folder written by data_scripts/build_lt.py, or a split it pushed to the Hub (user/repo)")
    g.add_argument("--dataset_config_name", default=None,
                   help="a named preset of the dataset builder, e.g. fashion_mnist_lt's quickstart (imb 100, n_max 600)")
    g.add_argument("--imb", type=float, default=100.0, help="imbalance ratio rho = n_max / n_min (CIFAR, Fashion-MNIST, imagefolder)")
    g.add_argument("--data_dir", default=None, help="local source files (CIFAR python dir, IDX dir, image root); default: the Hub")
    g.add_argument("--max_per_class", type=int, default=None, help="n_max of the LT split (default: the source's)")
    g.add_argument("--imb_seed", type=int, default=0, help="seed of the images chosen per class")
    g.add_argument("--selection", default="rng", choices=["rng", "lift", "first"])
    g.add_argument("--val_per_class", type=int, default=20)
    g.add_argument("--val_source", default="unused_train", choices=["unused_train", "test_slice"])
    g.add_argument("--train_list", default=None)
    g.add_argument("--val_list", default=None)
    g.add_argument("--test_list", default=None)
    g.add_argument("--class_names_file", default=None)
    g.add_argument("--test_dir", default=None, help="imagefolder_lt: a separate folder-per-class test set")
    g.add_argument("--val_dir", default=None, help="imagefolder_lt: a separate folder-per-class val set")
    g.add_argument("--relabel_by_name", type=str2bool, default=False,
                   help="list datasets: class ids by sorted class name (LIFT's iNaturalist labels)")
    g.add_argument("--many_threshold", type=int, default=100)
    g.add_argument("--few_threshold", type=int, default=20)
    g.add_argument("--cache_dir", default=None, help="datasets cache (default: the HF cache)")
    g.add_argument("--per_device_eval_batch_size", type=int, default=256)
    g.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1), help="dataloader workers per process")
    g.add_argument("--max_eval_samples", type=int, default=None,
                   help="debugging: evaluate on a seeded subset of this many val/test images (not the papers' protocol)")
    g.add_argument("--tte", default="none", choices=["none", *TTE_MODES.names()],
                   help="test-time ensembling for the test evaluation (LIFT: fivecrop)")
    return g


def build_train_parser():
    parser = argparse.ArgumentParser(
        description="Fine-tune CLIP/ViT on long-tailed data (LIFT, LT-Soups, LOS recipes).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, help="yaml preset (configs/*.yaml); CLI flags override it")
    add_data_args(parser)
    g = parser.add_argument_group("model")
    g.add_argument("--model_name_or_path", default="openai/clip-vit-base-patch16", help="Hub id or local dir of a CLIP or ViT checkpoint")
    g.add_argument("--from_scratch", type=str2bool, default=False, help="build the backbone from its config with random weights")
    g.add_argument("--init_from", default=None, help="start from an export dir (soup or run); e.g. LT-Soups stage 2 with --method head")
    g.add_argument("--method", default="adaptformer", choices=METHODS.names(),
                   help="; ".join(f"{name}: {METHODS.get(name).trains}" for name in METHODS))
    g.add_argument("--adapter_dim", type=int, default=None, help="AdaptFormer / LoRA rank r (default: LIFT's bottleneck rule)")
    g.add_argument("--lora_alpha", type=float, default=1.0)
    g.add_argument("--lora_dropout", type=float, default=0.0)
    g.add_argument("--lora_target_modules", nargs="+", default=None, help="default q_proj v_proj (CLIP) / query value (ViT)")
    g.add_argument("--head_type", default="cosine", choices=HEADS.names())
    g.add_argument("--head_scale", type=float, default=25.0, help="cosine head scale (LIFT 25, LT-Soups 30)")
    g.add_argument("--head_init", default="text", choices=HEAD_INITS.names())
    g.add_argument("--prompt_template", default="single", choices=PROMPT_MODES.names())
    g = parser.add_argument_group("loss and sampling")
    g.add_argument("--augment", default=None, choices=["rrc_flip", "flip", "none"],
                   help="training augmentation: RandomResizedCrop + flip (LIFT; the default), flip only, or none (the "
                        "eval view); --method head always trains on cached eval-view features")
    g.add_argument("--loss", default="la", choices=LOSSES.names())
    g.add_argument("--tau", type=float, default=1.0, help="logit-adjustment strength")
    g.add_argument("--label_smoothing", type=float, default=0.0, help="LOS over-smoothing: 0.98")
    g.add_argument("--sampler", default="random", choices=["random", "class_balanced", "sqrt"])
    g.add_argument("--balance_factor", type=float, default=None,
                   help="LT-Soups ingredient: train on the subset with every class capped at n_min * b")
    g.add_argument("--subset_seed", type=int, default=0, help="seed of the --balance_factor subset")
    g.add_argument("--subset_selection", default="rng", choices=["rng", "lt_soups"],
                   help="which images fill a --balance_factor subset: a seeded permutation per class (rng), or "
                        "LT-Soups' exact draw (rng.choice over each class in the LT split's draw order)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    g.add_argument("--learning_rate", type=float, default=0.01)
    g.add_argument("--weight_decay", type=float, default=5e-4)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--lr_scheduler_type", default="cosine", choices=["cosine", "cosine_epoch", "constant"])
    g.add_argument("--num_warmup_steps", type=int, default=None, help="default: 0 (SGD), max(20, 1%% of steps) (AdamW)")
    g.add_argument("--warmup_start_factor", type=float, default=None,
                   help="LT-Soups' warm-up: linear from this fraction of the lr at step 0 to the lr at step "
                        "--num_warmup_steps, then the cosine (LT-Soups: 1e-6); default: (step+1)/warmup of the lr")
    g.add_argument("--min_lr_ratio", type=float, default=0.0, help="cosine floor as a fraction of the peak lr (LT-Soups 0.1)")
    g.add_argument("--num_train_epochs", type=int, default=10)
    g.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    g.add_argument("--min_train_steps", type=int, default=None,
                   help="train at least this many steps (LT-Soups: 100, for its small balanced subsets)")
    g.add_argument("--per_device_train_batch_size", type=int, default=128)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--total_batch_size", type=int, default=None,
                   help="effective batch; sets the per-device batch from the accumulation steps and processes (LIFT: 128)")
    g.add_argument("--max_grad_norm", type=float, default=None)
    g.add_argument("--ema_decay", type=float, default=None, help="evaluate and export an EMA of the weights (LT-Soups 0.99)")
    g.add_argument("--ema_start", default="initial", choices=["initial", "first_step"],
                   help="EMA starts from the initial weights, or (torch AveragedModel, LT-Soups) is a copy of the "
                        "weights after the first optimizer step")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="default: from the accelerate config")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute the backbone's activations in the backward pass (the HF models' own): less memory, "
                        "about a third more compute")
    add_compile_args(parser)
    g = parser.add_argument_group("evaluation, checkpoints, outputs")
    g.add_argument("--eval_steps", default="epoch", help="evaluate on val every N optimizer steps, or 'epoch', or 'none'")
    g.add_argument("--num_evals", type=int, default=None,
                   help="instead of --eval_steps: evaluate every total_steps // N steps (LT-Soups: 5 per run)")
    g.add_argument("--select_metric", default="mean_class_acc", help="val metric that picks best/")
    g.add_argument("--output_dir", default="outputs/run")
    g.add_argument("--overwrite_output_dir", action="store_true", help="allow a non-empty --output_dir without resuming")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--checkpointing_steps", default=None, help="save a resume state every N optimizer steps, or 'epoch'")
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a step_* folder")
    g.add_argument("--with_tracking", action="store_true")
    g.add_argument("--report_to", default="tensorboard")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", default=None)
    g.add_argument("--hub_token", default=None, help="prefer the HF_TOKEN environment variable")
    return parser
