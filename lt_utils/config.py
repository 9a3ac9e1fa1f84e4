"""Command-line flags (HF example vocabulary): ONE table of constraints, yaml presets, the saved resolved config.

`FLAGS` holds every flag of the command lines (train_lt.py, eval_lt.py, soup.py, predict.py, data_scripts/build_lt.py)
with its type, default, range (open or closed bounds), choices (a list or a callable returning one, e.g. a registry's
names), nullability, secrecy and help. The same `Flag.coerce` parses and checks a value from the command line
(argparse's `type=`) and from a yaml preset, so a preset can never pass what the command line refuses. Every float must
be finite; a nullable number takes `none` on the command line (yaml's null, e.g. `--imb none`). A flag's `aliases` are
more names of the same entry (transformers' example names: `--train_dir` is `--data_dir`). A bad value is one line:
`error: --flag <value> <problem>; <fix>`, exit 2.

Each flag also says what it is to a training run (`Flag`: group, input_path, identity, info_key, may_change). Every
list of flags the project uses (DATA_FLAGS, INPUT_PATH_FLAGS, RECORDED_DATA_FLAGS, HF_SOURCE_FLAGS, RESUME_FREE_FLAGS,
...), train_lt.py's --help sections and the parts of the run spec (spec.py) are derived from those fields.

The choices of --method, --loss, --head_type, --head_init, --prompt_template, --tte and --merge_method are the
registries' names, read live: every registry and choice list is declared without torch (lt_utils/axes.py for those
whose code needs it, which it imports on first use), so the table (and so --help) loads without it.

A preset is a yaml mapping of flag names to values: `--config configs/lift_cifar100_lt.yaml --learning_rate 0.02`.
Unknown keys in a preset are an error, not silently ignored. Relative input paths inside a preset are found next to
the preset file, then in the repository (`resolve_preset_paths`); paths typed on the command line stay relative to
the working directory.
"""
import argparse
import importlib
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from . import axes, paper_tables
from .errors import UserError
from .fileio import atomic_write_text
from .methods import LORA_INITS, METHODS
from .prompts import PROMPT_MODES
from .protocols import PROTOCOLS
from .schedule import SCHEDULES
from .paths import expand

UINT32 = 2**32  # numpy / torch seeds


@dataclass(frozen=True)
class Flag:
    """One flag's constraints. kind: int, float, bool (true/false value), switch (store_true), str, path, steps
    (a positive int, 'epoch' or 'none'). low/high: bounds, open when low_open/high_open. choices: a list or a
    callable returning one. nullable: None (yaml null) is a valid value. nargs: argparse's, for lists. secret: never
    shown or recorded (`public_flags`, error messages).

    What the flag is to a run (everything below is derived from these, never listed by hand):
    group: a key of GROUPS (train_lt.py's --help section and the RunSpec part holding it, lt_utils/spec.py), or
        "other" for flags of the other command lines only. input_path: names a file or folder that is read, never
        written (outputs must stay apart from it; a preset's relative value is found next to the preset).
    identity: "data" (which images and classes a split holds) or "model" (the exported model's architecture and
        initial weights). info_key: for data identity, the LTInfo field that records it ("hf_source": inside
        LTInfo.hf_source). may_change: a resumed run may change it (workers, cadences, outputs, tracking,
        compilation); a flag that changes what is trained may not (`--resume_allow_changes` overrides)."""

    kind: str
    default: object = None
    help: str = ""
    low: float = None
    high: float = None
    low_open: bool = False
    high_open: bool = False
    choices: object = None
    nullable: bool = False
    nargs: str = None
    metavar: str = None
    secret: bool = False
    group: str = "other"
    input_path: bool = False
    identity: str = None
    info_key: str = None
    may_change: bool = False
    # more option strings of the same flag (transformers' example names where the project's differ)
    aliases: tuple = ()
    # other spellings of a value -> the value (--split val, the split's name in earlier versions)
    value_aliases: dict = None

    def choice_list(self):
        return list(self.choices() if callable(self.choices) else self.choices) if self.choices is not None else None

    def range_text(self):
        if self.low is None and self.high is None:
            return ""
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def coerce(self, name, raw, origin=""):
        """The typed, checked value of `raw` (a command-line string or a yaml value); UserError if it is not valid."""
        shown = "<hidden>" if self.secret else _show(raw)
        where = f" (in {origin})" if origin else ""

        def bad(problem, fix):
            return UserError(f"--{name} {shown}{where} {problem}; {fix}")

        if raw is None:
            if self.nullable:
                return None
            raise bad("is not allowed", "give a value or leave the flag out")
        if self.nargs and isinstance(raw, (list, tuple)):
            if not raw and self.nargs == "+":
                raise bad("is an empty list", "give at least one value")
            return [self.coerce(name, item, origin) for item in raw]
        if isinstance(raw, (list, tuple, dict)):
            raise bad("is a list or mapping", "give a single value")
        if isinstance(raw, str):
            _check_encodable(name, raw, where, shown)
            if self.nullable and self.kind in ("int", "float") and raw.strip().lower() == "none":
                return None  # a command line's yaml null
        kind = self.kind
        if kind in ("bool", "switch"):
            value = _to_bool(raw)
            if value is None:
                raise bad("is not a boolean", "use true or false")
            return value
        if kind in ("str", "path"):
            if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
                raise bad("is not a string", "quote the value")
            value = (self.value_aliases or {}).get(str(raw), str(raw))
            if kind == "path" and not value.strip():
                raise bad("is an empty path", "pass a file or folder path")
            if kind == "path":  # the checks and the writers see one path
                value = expand(value)
            self._check_choice(value, bad)
            return value
        if kind == "steps":
            text = str(raw).strip().lower() if not isinstance(raw, bool) else ""
            if text in ("epoch", "none"):
                return text
            value = _to_int(raw)
            if value is None or value < 1:
                raise bad("is not a positive number of steps", "pass N >= 1, 'epoch' or 'none'")
            return value
        if kind == "int":
            value = _to_int(raw)
            if value is None:
                raise bad("is not an integer", "pass a whole number")
        elif kind == "float":
            value = _to_float(raw)
            if value is None:
                raise bad("is not a number", "pass a number")
            if not math.isfinite(value):
                raise bad("is not finite", f"pass a finite number {self.range_text()}".rstrip())
        else:
            raise AssertionError(f"unknown flag kind {kind}")
        if not self._in_range(value):
            raise bad(f"is out of range: must be {self.range_text()}", "pass a value in that range")
        self._check_choice(value, bad)
        return value

    def _in_range(self, value):
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return True

    def _check_choice(self, value, bad):
        choices = self.choice_list()
        if choices is not None and value not in choices:
            raise bad("is not a valid choice", f"choose one of {', '.join(map(str, choices))}")


def _show(raw):
    if isinstance(raw, str):
        return raw.encode("utf-8", "backslashreplace").decode("utf-8") if raw else "''"
    if isinstance(raw, bool):
        return str(raw).lower()
    return str(raw)


def _check_encodable(name, value, where="", shown=None):
    """Non-UTF-8 bytes (surrogate-escaped by Python) cannot be written to configs, cards or JSON: refuse them now."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"--{name} {shown or _show(value)}{where} contains bytes that are not UTF-8; rename the path "
                        "or pass a UTF-8 value") from None


def _to_bool(raw):
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
    return None


def _to_int(raw):
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str):
        try:
            return int(raw.strip())
        except ValueError:
            return None
    return None  # floats (3.0 included) are not step counts or sizes


def _to_float(raw):
    if isinstance(raw, bool):
        return None
    if isinstance(raw, (int, float)):
        return float(raw)
    if isinstance(raw, str):
        try:
            return float(raw.strip())
        except ValueError:
            return None
    return None


def str2bool(value):
    parsed = _to_bool(value)
    if parsed is None:
        raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")
    return parsed


def _lazy(module, attr):
    """choices only a heavy module knows (torch.compile's backends), named here and read when a value is checked:
    --help does not list them, as it imports no torch."""
    def choices():
        names = getattr(importlib.import_module(module, __package__), attr)
        return list(names() if callable(names) else names)
    choices.unlisted = True
    return choices


def _report_targets():
    from accelerate.utils import LoggerType

    return ["all", *[t.value for t in LoggerType if t.value != "all"]]


_report_targets.unlisted = True  # accelerate imports torch; --help names LoggerType instead


def _method_help():
    """'name: what it trains; ...' of every --method."""
    return "; ".join(f"{name}: {METHODS.get(name).trains}" for name in METHODS)


def _pos(kind, default=None, help="", nullable=False, **kw):
    return Flag(kind, default, help, low=1, nullable=nullable, **kw)


def _nonneg(kind, default=None, help="", nullable=False, **kw):
    return Flag(kind, default, help, low=0, nullable=nullable, **kw)


def _seed(default=0, help="", **kw):
    return Flag("int", default, help, low=0, high=UINT32, high_open=True, **kw)


def _opt(kind, help="", **kw):
    return Flag(kind, None, help, nullable=True, **kw)


def _group(group, flags):
    return {name: replace(flag, group=group) for name, flag in flags.items()}


# the properties of a flag to a run (see Flag)
_FREE = {"may_change": True}
_MODEL = {"identity": "model"}
_HF = {"identity": "data", "info_key": "hf_source"}


def _lt(key):
    """data identity recorded in the LTInfo field `key`"""
    return {"identity": "data", "info_key": key}


# ------------------------------------------------------------------------------------------------ the table
# a group's key -> its title in train_lt.py --help; the key is also the RunSpec part holding its flags (spec.py)
GROUPS = {"data": "data", "model": "model", "method": "method", "loss": "loss and sampling",
          "optim": "optimisation", "compile": "compilation", "eval": "evaluation",
          "output": "checkpoints, outputs and tracking"}

_DATA = _group("data", {
    "dataset": Flag("path", "fashion_mnist_lt", "cifar100_lt, cifar10_lt, fashion_mnist_lt, imagenet_lt, places_lt, "
                    "inat2018, imagefolder_lt, hf_lt (set by --dataset_name), a folder written by data_scripts/build_lt.py, "
                    "or a split it pushed to the Hub (user/repo)", input_path=True, **_lt("dataset")),
    "dataset_config_name": Flag("str", None, "with --dataset_name: that dataset's `datasets` config; else a named preset "
                                "of the builder, e.g. fashion_mnist_lt's quickstart (imb 100, n_max 600), each builder "
                                "its own (checked against --dataset)", nullable=True, **_HF),
    "dataset_name": Flag("path", None, "any `datasets` image-classification dataset made long-tailed (builder hf_lt): a "
                         "Hub id (e.g. food101) or a local save_to_disk / parquet / imagefolder folder", nullable=True,
                         input_path=True, **_HF),
    "dataset_revision": _opt("str", "--dataset_name: the Hub revision (branch, tag or commit) to load", **_HF),
    "train_split": Flag("str", "train", "--dataset_name: the split the LT rule draws from", **_HF),
    "validation_split": _opt("str", "--dataset_name: a split to use as validation (default: unused train images, "
                             "--val_source)", **_HF),
    "test_split": _opt("str", "--dataset_name: the reported test split (default: 'test' if it has one, else "
                       "--test_per_class images per class held out of train)", **_HF),
    "image_column_name": Flag("str", "image", "--dataset_name: the column of images", **_HF),
    "label_column_name": Flag("str", "label", "--dataset_name: the column of labels (a ClassLabel, or ids / names with "
                              "--class_names_file)", **_HF),
    "max_train_samples": _pos("int", None, "--dataset_name: a seeded random subset (--imb_seed) of this many source "
                              "train images, taken before the LT rule", nullable=True, **_HF),
    "trust_remote_code": Flag("bool", False, "allow the code of the --dataset_name dataset (its loading script) and of "
                              "the --model_name_or_path checkpoint (auto_map) to run", **_HF),
    "imb": Flag("float", 100.0, "imbalance ratio rho = n_max / n_min (CIFAR, Fashion-MNIST, imagefolder, "
                "--dataset_name), or none: keep the source's own class counts (a dataset already long-tailed; groups "
                "from those counts)", low=1, nullable=True, **_lt("imb")),
    "data_dir": _opt("path", "local source files (CIFAR python dir, IDX dir, image root; imagefolder_lt: the "
                     "folder-per-class train images, alias --train_dir); default: the Hub", input_path=True,
                     identity="data", aliases=("train_dir",)),
    "max_per_class": _pos("int", None, "n_max of the LT split (default: the source's)", nullable=True,
                          **_lt("max_per_class")),
    "imb_seed": _seed(0, "seed of the images chosen per class", **_lt("seed")),
    "selection": Flag("str", "rng", "which images fill each class", choices=axes.SELECTION_MODES,
                      **_lt("selection")),
    "val_per_class": _nonneg("int", 20, "validation images per class", **_lt("val_per_class")),
    "val_source": Flag("str", "unused_train", choices=axes.VAL_SOURCES, **_lt("val_source")),
    "train_val_split": Flag("float", None, "a source without a validation split: hold out this fraction of each "
                            "class's train images as validation, before the LT rule (replaces --val_source and "
                            "--val_per_class)", low=0, high=1, low_open=True, high_open=True, nullable=True,
                            **_lt("train_val_split")),
    "train_list": _opt("path", input_path=True, identity="data"),
    "val_list": _opt("path", input_path=True, identity="data"),
    "test_list": _opt("path", input_path=True, identity="data"),
    "class_names_file": _opt("path", input_path=True, **_HF),
    "test_dir": _opt("path", "imagefolder_lt: a separate folder-per-class test set", input_path=True, identity="data"),
    "val_dir": _opt("path", "imagefolder_lt: a separate folder-per-class validation set", input_path=True,
                    identity="data", aliases=("validation_dir",)),
    "relabel_by_name": Flag("bool", False, "list datasets: class ids by sorted class name (LIFT's iNaturalist labels)",
                            identity="data"),
    "many_threshold": _nonneg("int", 100, "many: more than this many train images", **_lt("many_threshold")),
    "few_threshold": _nonneg("int", 20, "few: fewer than this many train images", **_lt("few_threshold")),
    "cache_dir": _opt("path", "datasets cache (default: the HF cache)", **_FREE),
    "per_device_eval_batch_size": _pos("int", 256, **_FREE),
    "num_workers": _nonneg("int", min(4, os.cpu_count() or 1), "dataloader workers per process", **_FREE),
    "max_eval_samples": _pos("int", None, "debugging: evaluate on a seeded subset of this many validation/test images "
                             "(not the papers' protocol)", nullable=True),
    "tte": Flag("str", "none", "test-time ensembling for the test evaluation (LIFT: fivecrop)",
                choices=lambda: ["none", *axes.TTE_MODES], **_FREE),
    "tte_views": _pos("int", 1, "--tte randaug: random resized crop + flip views per image (LIFT's randaug_times, "
                      "default 1)", **_FREE),
    "tte_expand": _nonneg("int", None, "--tte fivecrop/tencrop: pixels added to the shorter side before cropping "
                          "(default 1.5 patches: 24 for /16 as LIFT, 21 for /14)", nullable=True, **_FREE),
    "interpolation": Flag("str", None, "resize / crop interpolation (LIFT: bilinear, torchvision's default); default: "
                          "the checkpoint's image processor (CLIP: bicubic); training records it with the export",
                          choices=["bilinear", "bicubic", "nearest"], nullable=True),
    "groups_from_imb": Flag("float", None, "many/medium/few from the counts of this rho's split of the same source "
                            "(LIFT: 100 for CIFAR-100-LT rho 50 / 10); both groupings are reported where they differ",
                            low=1, nullable=True, **_lt("groups_from_imb")),
})

_MODEL_FLAGS = _group("model", {
    "model_name_or_path": Flag("path", "openai/clip-vit-base-patch16", "Hub id or local dir of a CLIP or ViT checkpoint",
                               input_path=True, **_MODEL),
    "from_scratch": Flag("bool", False, "build the backbone from its config with random weights", **_MODEL),
    "init_from": _opt("path", "start from an export dir (soup or run); e.g. LT-Soups stage 2 with --method head",
                      input_path=True, **_MODEL),
    "ignore_mismatched_sizes": Flag("bool", False, "--init_from an export trained on other classes: keep its backbone "
                                    "and give it a new head for these classes (--head_init)", **_MODEL),
    "head_type": Flag("str", "cosine", choices=axes.HEADS, **_MODEL),
    "head_scale": Flag("float", 25.0, "cosine head scale (LIFT 25, LT-Soups 30)", low=0, low_open=True, **_MODEL),
    "head_init": Flag("str", "text", choices=axes.HEAD_INITS, **_MODEL),
    "prompt_template": Flag("str", "single", "zero-shot / text-init prompts: 'a photo of a {}.', the 80 ImageNet "
                            "templates averaged, the bare class name, or --prompt_descriptor_file's descriptions",
                            choices=PROMPT_MODES, **_MODEL),
    "prompt_descriptor_file": _opt("path", "--prompt_template descriptor: a JSON file {class name: [description, ...]}",
                                   input_path=True, **_MODEL),
    "seed": _seed(0, "seed of new modules, the random head, sampling and augmentation", **_MODEL),
    "image_size": _pos("int", None, "CNN backbones (resnet, cifar_resnet): the image size trained and evaluated "
                       "(default: the checkpoint's image processor, else 224 for resnet, 32 for cifar_resnet)",
                       nullable=True, **_MODEL),
})

_METHOD = _group("method", {
    "method": Flag("str", "adaptformer", _method_help, choices=METHODS, **_MODEL),
    "adapter_dim": _pos("int", None, "AdaptFormer / adapter / LoRA rank r (default: LIFT's 2**max(0, floor(log2(K / 2L))))",
                        nullable=True, **_MODEL),
    # 0 passes the table so that its refusal can name the method that is LIFT's partial 0 (training.check_partial)
    "partial_layers": _nonneg("int", None, "tune only the last k >= 1 transformer blocks (LIFT's partial; any method "
                                           "but full_all and head)", nullable=True, **_MODEL),
    "vpt_len": _pos("int", 10, "prompt tokens per prompted block (vpt_shallow, vpt_deep)", **_MODEL),
    "mask_ratio": Flag("float", None, "--method mask: fraction of each Linear's entries trained (default: LIFT's "
                                      "K / (12 L D), floored to a multiple of 0.001, at least 0.001)",
                       low=0, low_open=True, high=1, nullable=True, **_MODEL),
    "mask_seed": _seed(0, "--method mask: seed of the entries chosen (LIFT: 0)", **_MODEL),
    "lora_init": Flag("str", "peft", "LoRA A init: peft's U(+-1/sqrt(D)) or LIFT's U(+-1/sqrt(r)) (its A is (D, r))",
                      choices=LORA_INITS, **_MODEL),
    "lora_alpha": Flag("float", 1.0, low=0, low_open=True, **_MODEL),
    "lora_dropout": Flag("float", 0.0, low=0, high=1, high_open=True, **_MODEL),
    "lora_target_modules": Flag("str", None, "default q_proj v_proj (CLIP) / query value (ViT)", nullable=True, nargs="+",
                                **_MODEL),
    "head_features": Flag("str", "cached", "--method head: features of the eval view computed once (fast), or "
                          "augmented images through the frozen backbone every epoch (the papers' stage 2: LOS, LT-Soups)",
                          choices=["cached", "augmented"]),
    "backbone_bn": Flag("str", "eval", "--head_features augmented: the frozen backbone's BatchNorm uses its running "
                        "statistics (eval) or batch statistics that keep updating them (train; LOS)",
                        choices=["eval", "train"]),
})

_LOSS = _group("loss", {
    "augment": Flag("str", None, "training augmentation: RandomResizedCrop + flip (LIFT; the default), 4-px padded "
                    "random crop + flip (CIFAR papers, LOS), flip only, or none (the eval view); --method head with "
                    "cached features trains on the eval view",
                    choices=["rrc_flip", "crop_flip", "flip", "none"], nullable=True),
    "augment_on_device": Flag("switch", False, "--augment rrc_flip on small images of one size (CIFAR, "
                              "Fashion-MNIST): the loader draws each crop box, the accelerator crops, resizes, flips and "
                              "normalises the batch (the same boxes, so the same seeded determinism)"),
    "loss": Flag("str", "la", choices=axes.LOSSES),
    "tau": Flag("float", 1.0, "logit-adjustment strength", low=0),
    "label_smoothing": Flag("float", 0.0, "LOS over-smoothing: 0.98", low=0, high=1, high_open=True),
    # LIFT's defaults (utils/losses.py); LDAM's scale is --head_scale
    "focal_gamma": Flag("float", 2.0, "focal: the focusing exponent gamma", low=0),
    "ldam_max_margin": Flag("float", 0.5, "ldam: margin of the rarest class (x --head_scale)", low=0, low_open=True),
    "cb_beta": Flag("float", 0.9999, "cb: beta of the effective number (1 - beta^n) / (1 - beta)", low=0, low_open=True,
                    high=1, high_open=True),
    "grw_exponent": Flag("float", 1.0, "grw: class weights (n_c / N)^-exponent", low=0),
    "lade_lambda": Flag("float", 0.1, "lade: ReMINE regulariser lambda", low=0),
    "lade_weight": Flag("float", 0.1, "lade: weight of the LADER estimation loss", low=0),
    "sampler": Flag("str", "random", choices=["random", "class_balanced", "sqrt"]),
    "balance_factor": Flag("float", None, "LT-Soups ingredient: train on the subset with every class capped at n_min * b",
                           low=1, nullable=True),
    "subset_seed": _seed(0, "seed of the --balance_factor subset"),
    "subset_selection": Flag("str", "rng", "which images fill a --balance_factor subset: a seeded permutation per "
                             "class (rng), or LT-Soups' exact draw (rng.choice over each class in the LT split's draw "
                             "order)", choices=["rng", "lt_soups"]),
})

_OPTIM = _group("optim", {
    "optimizer": Flag("str", "sgd", choices=["sgd", "adamw"]),
    "learning_rate": Flag("float", 0.01, low=0, low_open=True),
    "weight_decay": Flag("float", 5e-4, low=0),
    "momentum": Flag("float", 0.9, "SGD momentum / AdamW beta1", low=0, high=1, high_open=True),
    "lr_scheduler_type": Flag("str", "cosine", "cosine (to --min_lr_ratio), cosine_epoch (LIFT), constant; "
                              "transformers' linear, constant_with_warmup, inverse_sqrt: as "
                              "transformers.get_scheduler steps them (warm-up step/warmup from 0)", choices=SCHEDULES),
    "num_warmup_steps": _nonneg("int", None, "default: 0 (SGD), max(20, 1%% of steps) (AdamW)", nullable=True),
    "warmup_start_factor": Flag("float", None, "LT-Soups' warm-up: linear from this fraction of the lr at step 0 to the "
                                "lr at step --num_warmup_steps, then the cosine (LT-Soups: 1e-6); default: "
                                "(step+1)/warmup of the lr", low=0, high=1, nullable=True),
    "min_lr_ratio": Flag("float", 0.0, "cosine floor as a fraction of the peak lr (LT-Soups 0.1)", low=0, high=1),
    "num_train_epochs": _pos("int", 10),
    "max_train_steps": _pos("int", None, "overrides --num_train_epochs", nullable=True),
    "min_train_steps": _nonneg("int", None, "train at least this many steps (LT-Soups: 100, for its small balanced subsets)",
                            nullable=True),
    "per_device_train_batch_size": _pos("int", 128),
    "gradient_accumulation_steps": _pos("int", 1),
    # resolved into --per_device_train_batch_size, which a resume compares
    "total_batch_size": _pos("int", None, "effective batch; sets the per-device batch from the accumulation steps and "
                             "processes (LIFT: 128)", nullable=True, **_FREE),
    "max_grad_norm": Flag("float", None, "clip the gradient norm to this (unset or 0: no clipping)", low=0,
                          nullable=True),
    "ema_decay": Flag("float", None, "evaluate and export an EMA of the weights (LT-Soups 0.99; 0: none)", low=0, high=1,
                      high_open=True, nullable=True),
    "ema_start": Flag("str", "initial", "EMA starts from the initial weights, or (torch AveragedModel, LT-Soups) is a "
                      "copy of the weights after the first optimizer step", choices=["initial", "first_step"]),
    "mixed_precision": Flag("str", None, "default: from the accelerate config", choices=["no", "fp16", "bf16"],
                            nullable=True),
    "sync_bn": Flag("switch", False, "synchronise BatchNorm statistics across processes (DDP): N processes then equal "
                    "one with the global batch"),
    "gradient_checkpointing": Flag("switch", False, "recompute the backbone's activations in the backward pass (the "
                                   "HF models' own): less memory, about a third more compute", **_FREE),
})

_COMPILE = _group("compile", {
    "torch_compile": Flag("switch", False, "torch.compile the model (through accelerate's dynamo plugin); the first "
                          "steps are slower", **_FREE),
    "torch_compile_backend": Flag("str", None, "a torch.compile backend (default: inductor)",
                                  choices=_lazy(".compile", "compile_backends"), nullable=True, **_FREE),
    "torch_compile_mode": Flag("str", None, "torch.compile's mode (default: torch's)", nullable=True,
                               choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                               **_FREE),
})

_EVAL = _group("eval", {
    "eval_steps": Flag("steps", "epoch", "evaluate on validation every N optimizer steps, or 'epoch', or 'none'", **_FREE),
    "num_evals": _pos("int", None, "instead of --eval_steps: evaluate every total_steps // N steps (LT-Soups: 5 per "
                      "run)", nullable=True, **_FREE),
    # the best score kept so far is of this metric: another one mid-run would compare unlike numbers
    "select_metric": Flag("str", "mean_class_acc", "validation metric that picks best/ (greedy soups: ranks and keeps)",
                          choices=axes.SELECTABLE),
    # which tested model is the paper's number; it decides what is kept and tested during the run, so it may not change
    "protocol": Flag("str", "best_val", "the row of all_results.json comparable with the paper: best_val (ours), final "
                     "(LIFT), best_test (LOS, optimistic), ema_and_raw_val (LT-Soups: also best_raw/)",
                     choices=PROTOCOLS),
    "test_precision": Flag("str", "train", "precision of the test evaluation of best/ and final/: train (the run's "
                           "autocast) or fp32 (LIFT)", choices=["train", "fp32"], **_FREE),
})

_OUTPUT = _group("output", {
    "output_dir": Flag("path", "outputs/run", **_FREE),
    "overwrite_output_dir": Flag("switch", False, "allow a non-empty --output_dir without resuming", **_FREE),
    "dry_run": Flag("switch", False, "build the data and the model, print the run header and, as the last stdout line, "
                                     "a JSON object of the trainable parameters (trainable, head, backbone); no training "
                                     "(scripts/reproduce.py: print the rows and their commands, run nothing)",
                    **_FREE),
    "checkpointing_steps": Flag("steps", None, "save a resume state every N optimizer steps, or 'epoch'", nullable=True,
                                **_FREE),
    "resume_from_checkpoint": _opt("path", "'latest' or a step_* folder", **_FREE),
    "resume_allow_changes": Flag("switch", False, "--resume_from_checkpoint: continue even where flags that change "
                                 "what is trained differ from the checkpoint's (recorded in log.txt and run_spec.json)",
                                 **_FREE),
    "with_tracking": Flag("switch", False, **_FREE),
    "report_to": Flag("str", "tensorboard", "all or a tracker of accelerate.utils.LoggerType", choices=_report_targets,
                      **_FREE),
    "push_to_hub": Flag("switch", False, **_FREE),
    "hub_model_id": _opt("str", **_FREE),
    "hub_push": Flag("str", "model", "--push_to_hub: the whole model (a LoRA run's plain peft adapter beside it, in "
                     "adapter/), or a LoRA run's peft adapter alone (small; loads with PeftModel.from_pretrained onto "
                     "its base, which must then be a Hub id)", choices=["model", "adapter"], **_FREE),
    "hub_token": Flag("str", None, "prefer the HF_TOKEN environment variable (never recorded or shown)", nullable=True,
                      secret=True, **_FREE),
})

_OTHER = {  # eval_lt.py, soup.py, build_lt.py, predict.py
    "which": Flag("str", None, "the export a run dir stands for; default: best/, else final/",
                  choices=axes.RUN_EXPORTS, nullable=True),
    "split": Flag("str", "test", "train, validation (or val) or test",
                  choices=axes.SPLITS, value_aliases=axes.LEGACY_SPLIT_NAMES),
    "zero_shot": Flag("path", None, "add a zero-shot row for this CLIP or SigLIP id or dir (SigLIP's sigmoid scores "
                      "have the same argmax as its logits)", nullable=True, metavar="MODEL", input_path=True),
    "overwrite": Flag("switch", False, "replace existing outputs (--output_dir; predict.py: --output)"),
    "save_predictions": Flag("switch", False, "also write predictions.csv: per image of the split, its label, "
                             "prediction, probability, top-k"),
    "top_k": _pos("int", 5, "labels and probabilities kept per image (predict.py, --save_predictions)"),
    "output": Flag("path", None, "the CSV to write (required)", nullable=True),
    "batch_size": _pos("int", 32, "images per forward pass"),
    "mode": Flag("str", None, "default: weighted if --weights is given, else uniform", choices=axes.MODES,
                 nullable=True),
    "weights": Flag("float", None, "one weight per ingredient, used as given: they must sum to 1 (or pass --normalize)",
                    nullable=True, nargs="+"),
    "normalize": Flag("switch", False, "divide --weights by their sum"),
    "lam": Flag("float", 0.7, "progressive: weight of each next ingredient, soup = (1-lam)*soup + lam*next",
                low=0, high=1, low_open=True),
    "alpha": Flag("float", 1.0, "WiSE-FT: (1-alpha)*zero-shot + alpha*soup; 1 = the soup itself", low=0, high=1),
    # soup.py --merge_method: each method's parameters default to None here, so a flag the method does not take is
    # refused rather than ignored; the methods' own defaults are in lt_utils/merge.py
    "merge_method": Flag("str", "average", "how the weighted ingredients combine, tensor by tensor (--mode picks them "
                         "and their weights): average (the soup itself), or their task vectors (fine-tuned minus "
                         "zero-shot, so the base model is loaded): task_arithmetic, ties (trim, elect sign, disjoint "
                         "mean), dare_linear / dare_ties (random drop and rescale, then linear / ties)",
                         choices=axes.MERGE_METHODS),
    "scaling": Flag("float", None, "task vector methods: lambda, soup = zero-shot + lambda * merged task vector "
                    "(default 1: with weights summing to 1, task_arithmetic is then the weighted soup; TIES-merging's "
                    "value; task arithmetic tunes it on validation, > 1 extrapolates)", low=0, low_open=True, nullable=True),
    "density": Flag("float", None, "ties, dare_*: fraction of each task vector's entries kept, per tensor: ties keeps "
                    "the largest (default 0.2, TIES-merging's top 20%%), dare_* a random draw rescaled by 1/density "
                    "(default 0.1, DARE's drop rate 0.9)", low=0, high=1, low_open=True, nullable=True),
    "majority_sign_method": Flag("str", None, "ties, dare_ties: the sign elected per entry is that of the sum of the kept "
                                 "values (total, the default) or of the most kept values (frequency)",
                                 choices=axes.SIGN_METHODS, nullable=True),
    "merge_seed": Flag("int", None, "dare_*: seed of the dropped entries (default 0); each tensor of each ingredient "
                       "draws from its own stream, so the same seed and ingredient list give the same soup",
                       low=0, high=UINT32, high_open=True, nullable=True),
    "test_per_class": _pos("int", 50, "held-out test images per class without --test_dir"),
    "push_to_hub_repo": Flag("str", None, "also push the split to this Hub dataset repo", nullable=True, metavar="REPO"),
    # scripts/reproduce.py
    "paper": Flag("str", None, "the paper whose tables to run (configs/paper_tables/<paper>.yaml)",
                  choices=paper_tables.papers),
    "table": Flag("str", None, "one table of the paper (its number); default: every table", nullable=True),
    "tiny": Flag("switch", False, "every row end to end on Fashion-MNIST-LT and tiny models, a step or two each: proves "
                 "the runner, not the paper"),
    "launcher": Flag("str", "python", "how the rows' commands run: python (in this process, in order), accelerate "
                     "(accelerate launch, one process group per command) or slurm (with --emit: srun lines)",
                     choices=paper_tables.LAUNCHERS),
    "emit": Flag("switch", False, "write the rows' commands as a job list (jobs.sh) instead of running them"),
}

FLAGS = {**_DATA, **_MODEL_FLAGS, **_METHOD, **_LOSS, **_OPTIM, **_COMPILE, **_EVAL, **_OUTPUT, **_OTHER}
# soup.py's merge-method parameters: the flags every method of lt_utils.merge takes its parameters from (the parser
# lists them without importing the methods, which import torch)
MERGE_PARAM_FLAGS = ("scaling", "density", "majority_sign_method", "merge_seed")


def flags_where(**props):
    """Names of the table's flags whose properties equal `props` (e.g. group="data", input_path=True), in table order."""
    return tuple(name for name, flag in FLAGS.items() if all(getattr(flag, k) == v for k, v in props.items()))


# ------------------------------------------------------------------------------ lists derived from the table
TRAIN_FLAGS = tuple(name for name, flag in FLAGS.items() if flag.group in GROUPS)
DATA_FLAGS = flags_where(group="data")
COMPILE_FLAGS = flags_where(group="compile")
# flags naming files or folders read (never written): outputs must stay apart from them
INPUT_PATH_FLAGS = flags_where(input_path=True)
DATA_INPUT_FLAGS = flags_where(group="data", input_path=True)
# data flag -> the LTInfo field that records it: how an export or split tells which data it was built from
RECORDED_DATA_FLAGS = {name: flag.info_key for name, flag in FLAGS.items() if flag.info_key not in (None, "hf_source")}
# the `datasets` source of hf_lt, recorded in LTInfo.hf_source
HF_SOURCE_FLAGS = flags_where(info_key="hf_source")
# train flags a resumed run may change (the others change what is trained)
RESUME_FREE_FLAGS = frozenset(name for name in TRAIN_FLAGS if FLAGS[name].may_change)
SECRET_FLAGS = frozenset(flags_where(secret=True))


def flag_help(flag):
    parts = [flag.help() if callable(flag.help) else flag.help] if flag.help else []
    # every list is declared without torch (lt_utils.axes and the light registries): --help reads them live
    choices = None if getattr(flag.choices, "unlisted", False) else flag.choice_list()
    if choices:
        parts.append("choices: " + ", ".join(map(str, choices)))
    if flag.range_text():
        parts.append(flag.range_text())
    return "; ".join(parts) or None


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors (one line, exit 2 through cli_entry), not usage dumps."""

    def error(self, message):
        # "argument --imb: --imb nan is not finite; ..." -> the table's own message
        if message.startswith("argument ") and ": --" in message:
            message = message.split(": ", 1)[1]
        if message.startswith("unrecognized arguments"):
            message += "; see --help for the flags"
        elif "required" in message or "expected" in message or "invalid choice" in message:
            message += "; see --help"
        raise UserError(message)


class _Type:
    """argparse `type=` calling the table: CLI values get exactly the checks preset values get."""

    def __init__(self, name, flag):
        self.name, self.flag = name, flag
        self.__name__ = flag.kind

    def __call__(self, raw):
        try:
            return self.flag.coerce(self.name, raw)
        except UserError as err:
            raise argparse.ArgumentTypeError(str(err)) from None


def add_flags(parser, names, dest=None, aliases=None, **defaults):
    """Add the table's flags `names` to `parser` (or an argument group); `defaults` override the table's defaults.
    `dest` maps a command-line name to a table entry of another name (build_lt.py's --push_to_hub REPO); `aliases`
    gives extra option strings of a flag (soup.py's --lambda)."""
    for name in names:
        key = (dest or {}).get(name, name)
        options = [f"--{name}", *(f"--{a}" for a in FLAGS[key].aliases), *(aliases or {}).get(name, ())]
        flag = FLAGS[key]
        if name in defaults:
            flag = replace(flag, default=defaults[name])
        kwargs = {"default": flag.default, "help": flag_help(flag)}
        if flag.kind == "switch":
            parser.add_argument(*options, dest=name, action="store_true", **kwargs)
        else:
            bool_kwargs = {"nargs": "?", "const": True} if flag.kind == "bool" else {"nargs": flag.nargs}
            parser.add_argument(*options, dest=name, type=_Type(name, flag), metavar=flag.metavar, **bool_kwargs,
                                **kwargs)
        _table_of(parser)[name] = flag
    return parser


def _table_of(parser):
    root = getattr(parser, "_lt_root", parser)  # argument groups register on their parser
    if not hasattr(root, "_lt_flags"):
        root._lt_flags = {}
    return root._lt_flags


def add_group(parser, title, names, description=None, **defaults):
    group = parser.add_argument_group(title, description)
    group._lt_root = parser
    return add_flags(group, names, **defaults)


def parse_args_with_config(parser, argv=None):
    """timm's two-pass trick: read `--config FILE` first, make its (checked) values the defaults, then parse the rest."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**resolve_preset_paths(load_preset(known.config, parser), known.config))
    return parser.parse_args(argv)


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader refusing a key set twice (plain yaml keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        for i, key in enumerate(keys):
            if key in keys[:i]:
                raise _DuplicateKey(f"{key!r} (line {node.value[i][0].start_mark.line + 1})")
        return super().construct_mapping(node, deep=deep)


def load_preset(path, parser):
    """{dest: value} of a yaml preset, each value parsed and checked by the flag table exactly as on the command line."""
    _check_encodable("config", str(path))
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found; pass an existing yaml file to --config (see configs/)")
    try:
        preset = yaml.load(path.read_bytes().decode("utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text; save it as UTF-8 yaml") from None
    except _DuplicateKey as err:
        raise UserError(f"config file {path} sets {err} twice; keep one line per flag") from None
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid yaml ({err.__class__.__name__}); fix its syntax") from None
    except OSError as err:
        raise UserError(f"config file {path} cannot be read ({err.strerror}); check its permissions") from None
    if not isinstance(preset, dict):
        raise UserError(f"config file {path} must be a mapping of flag names to values; write one `flag: value` per line")
    table = _table_of(parser)
    for alias, name in {alias: name for name, flag in table.items() for alias in flag.aliases}.items():
        if alias in preset:
            if name in preset:
                raise UserError(f"config file {path} sets both {name} and its alias {alias}; keep one")
            preset[name] = preset.pop(alias)
    unknown = sorted(str(k) for k in preset if k not in table)
    if unknown:
        raise UserError(f"config file {path} has unknown keys {unknown}; use the flag names of --help")
    return {key: table[key].coerce(key, value, origin=str(path)) for key, value in preset.items()}


REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_preset_paths(preset, preset_path):
    """Relative input paths of a preset, looked up next to the preset file, then at the repository root: the first
    that exists is made absolute, so a preset works from any working directory. A value found in neither place (a
    Hub id, a dataset name) is kept as written."""
    resolved = dict(preset)
    for key in INPUT_PATH_FLAGS:
        value = preset.get(key)
        if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
            continue
        for root in (Path(preset_path).resolve().parent, REPO_ROOT):
            if (root / value).exists():
                resolved[key] = str(root / value)
                break
    return resolved


def public_flags(values):
    """Flags as they may be recorded (config.yaml, trackers, logs, cards): the table's secret flags (`--hub_token`) are
    blanked, so a recorded config never carries a Hub token (re-used, it falls back to HF_TOKEN / huggingface-cli
    login). Error messages hide them too (`Flag.coerce`)."""
    return {k: (None if k in SECRET_FLAGS else v) for k, v in dict(values).items()}


def save_resolved_config(values, path):
    """The exact flags a run used (secrets blanked), re-usable as `--config`."""
    atomic_write_text(path, yaml.safe_dump(public_flags(values), sort_keys=True))


def resolve_cross_flags(values):
    """Constraints between flags (each flag alone is checked by the table): `values` (a flag -> value mapping) with
    --dataset resolved, as a new dict."""
    values = {**values, **resolve_dataset_flags(values)}
    many, few = values.get("many_threshold"), values.get("few_threshold")
    if many is not None and few is not None and few > many + 1:
        raise UserError(f"--few_threshold {few} is above --many_threshold {many} + 1, so a class could be both many and "
                        "few; lower --few_threshold or raise --many_threshold")
    return values


HF_BUILDER = "hf_lt"


def resolve_dataset_flags(values):
    """--dataset_name selects the hf_lt builder (recorded as --dataset hf_lt): {"dataset": "hf_lt"}, else {}; another
    --dataset with it names two sources. Without it, --dataset_config_name is a builder preset, checked against every
    builder's names here."""
    name, dataset = values.get("dataset_name"), values.get("dataset")
    if name is not None:
        if dataset not in (None, HF_BUILDER, FLAGS["dataset"].default):
            raise UserError(f"--dataset {dataset} and --dataset_name {name} name two sources; pass one (--dataset_name "
                            "alone builds the LT split from that `datasets` source)")
        return {"dataset": HF_BUILDER}
    config = values.get("dataset_config_name")
    if config is not None and dataset != HF_BUILDER:
        from .data.loading import builder_config_names

        if config not in builder_config_names():
            raise UserError(f"--dataset_config_name {config} is not a valid choice; choose one of "
                            f"{', '.join(builder_config_names())} (or name a `datasets` config with --dataset_name)")
    return {}


def recorded_flags(info):
    """The data flags an LTInfo (as a dict: lt_info.json) records: how to rebuild the same split."""
    flags = {flag: info[key] for flag, key in RECORDED_DATA_FLAGS.items() if key in info}
    hf = info.get("hf_source") or {}
    flags.update({flag: hf[flag] for flag in HF_SOURCE_FLAGS if flag in hf})
    return flags


def add_data_args(parser, **defaults):
    return add_group(parser, GROUPS["data"], DATA_FLAGS, **defaults)


def add_compile_args(parser):
    return add_group(parser, GROUPS["compile"], COMPILE_FLAGS)


def build_train_parser():
    parser = ArgumentParser(description="Fine-tune CLIP/ViT on long-tailed data (LIFT, LT-Soups, LOS recipes).",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, help="yaml preset (configs/*.yaml); CLI flags override it")
    for group, title in GROUPS.items():
        add_group(parser, title, flags_where(group=group))
    return parser


def parse_train_args(argv=None):
    """The train flags as a dict (--config read, every value and the constraints between them checked)."""
    values = vars(parse_args_with_config(build_train_parser(), argv))
    values.pop("config")
    return resolve_cross_flags(values)
