"""The set-up steps of train_lt.py, one function each: accelerator, data, model, loaders, optimizer, exports."""
import contextlib
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from .checkpoint import export_overrides, load_overrides, read_export_meta, write_export
from .config import DATA_INPUT_FLAGS
from .data import capped_subset, load_lt_dataset
from .errors import UserError, require
from .heads import class_mean_head_init, fingerprint, random_head_init, set_head_weight, text_head_init
from .hub import model_card
from .models import build_lt_model
from .peft_methods import apply_method, bottleneck_dim, export_state_dict
from .samplers import ClassBalancedSampler
from .transforms import ApplyTransform, build_eval_transform, build_train_transform, build_tte_transform, collate

INIT_FROM_METHODS = ("head", "full", "bitfit")


# ----------------------------------------------------------------------------------------------- accelerator
def build_accelerator(args):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedType

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        **cpu_multiprocess_kwargs(),
    )
    if accelerator.num_processes > 1 and accelerator.distributed_type == DistributedType.NO:
        raise UserError("several processes but no distributed backend; on CPU set ACCELERATE_USE_CPU=1 (DDP) or "
                        "ACCELERATE_USE_DEEPSPEED=true with a DeepSpeed config")
    check_deepspeed_accumulation(accelerator, args)
    check_zero3_export(accelerator, args)
    fill_deepspeed_clipping(accelerator, args)
    return accelerator


def check_zero3_export(accelerator, args):
    """Under ZeRO-3 an export needs the 16-bit gather, and parameters are partitioned (an EMA copy would hold empty
    tensors): refuse at start rather than fail, or silently mix EMA and raw weights, after training."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        return
    if args.ema_decay:
        raise UserError("--ema_decay does not work under DeepSpeed ZeRO-3 (parameters are partitioned); use ZeRO-2 "
                        "(accelerate_configs/ds_zero2.yaml) or drop --ema_decay")
    if plugin.deepspeed_config.get("zero_optimization", {}).get("stage3_gather_16bit_weights_on_model_save") is not True:
        raise UserError("DeepSpeed ZeRO-3 without stage3_gather_16bit_weights_on_model_save: true cannot export complete "
                        "weights; set it in the DeepSpeed JSON (or zero3_save_16bit_model: true in the accelerate config)")


def cpu_multiprocess_kwargs():
    """Several processes without a GPU (torchrun on CPU). accelerate picks gloo DDP only when told the run is on
    CPU, and under DeepSpeed (which it turns off on CPU) finds no backend at all, so each process would train
    alone. Say which: cpu=True for DDP, an explicit gloo process group for DeepSpeed."""
    import os

    from accelerate.utils import InitProcessGroupKwargs

    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return {}
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": True}


def fill_deepspeed_clipping(accelerator, args):
    """accelerate fills DeepSpeed's 'auto' gradient_clipping with 1.0; make it --max_grad_norm (0: none) instead."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.deepspeed_config.get("gradient_clipping") == "auto":
        plugin.deepspeed_config["gradient_clipping"] = float(args.max_grad_norm or 0.0)


@contextlib.contextmanager
def plain_model_init(accelerator):
    """Build models unpartitioned under ZeRO-3: transformers would otherwise construct them inside
    deepspeed.zero.Init, and the head init (CLIP text features, class means) needs whole weights. The models here
    are small enough (ViT-L/14@336: 0.3B) to build on every process; prepare() partitions them afterwards."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def check_deepspeed_accumulation(accelerator, args):
    """accelerate silently takes DeepSpeed's accumulation when the two disagree; refuse instead (hf_stack §14.3)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds_steps = plugin.deepspeed_config.get("gradient_accumulation_steps")
    if ds_steps not in (None, "auto") and int(ds_steps) != args.gradient_accumulation_steps:
        raise UserError(f"DeepSpeed config has gradient_accumulation_steps={ds_steps} but --gradient_accumulation_steps="
                        f"{args.gradient_accumulation_steps}; set one of them so they agree (or 'auto' in the DeepSpeed config)")
    if accelerator.gradient_accumulation_steps != args.gradient_accumulation_steps:
        raise UserError(f"accelerate uses gradient_accumulation_steps={accelerator.gradient_accumulation_steps} but "
                        f"--gradient_accumulation_steps={args.gradient_accumulation_steps}; make the accelerate config agree")


def resolve_batch_size(args, num_processes):
    """--total_batch_size = per-device batch x accumulation x processes; it must divide exactly."""
    require(args.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be >= 1")
    if args.total_batch_size is None:
        return
    denom = args.gradient_accumulation_steps * num_processes
    require(args.total_batch_size % denom == 0,
            f"--total_batch_size {args.total_batch_size} is not divisible by gradient_accumulation_steps x processes "
            f"= {args.gradient_accumulation_steps} x {num_processes}; pick an accumulation that divides it")
    args.per_device_train_batch_size = args.total_batch_size // denom


# ------------------------------------------------------------------------------------------------------- data
def load_data(args, accelerator):
    with accelerator.main_process_first():
        ds, info = load_lt_dataset(
            args.dataset, imb=args.imb, data_dir=args.data_dir, max_per_class=args.max_per_class, seed=args.imb_seed,
            selection=args.selection, val_per_class=args.val_per_class, val_source=args.val_source,
            train_list=args.train_list, val_list=args.val_list, test_list=args.test_list,
            class_names_file=args.class_names_file, many_threshold=args.many_threshold,
            few_threshold=args.few_threshold, cache_dir=args.cache_dir, test_dir=getattr(args, "test_dir", None),
            val_dir=getattr(args, "val_dir", None), relabel_by_name=getattr(args, "relabel_by_name", False))
    return ds, record_saved_folder(info, args.dataset)


def record_saved_folder(info, dataset_arg):
    """A split loaded from a build_lt.py folder is recorded by that folder, so eval_lt.py finds the same images."""
    import dataclasses

    from .data.loading import is_saved_lt_dir

    return dataclasses.replace(info, dataset=str(Path(dataset_arg).resolve())) if is_saved_lt_dir(dataset_arg) else info


def limit_eval_splits(ds, max_eval_samples):
    """--max_eval_samples: a seeded subset of val and test, for quick debugging runs only."""
    if not max_eval_samples:
        return ds
    for split in ("val", "test"):
        if len(ds[split]) > max_eval_samples:
            ds[split] = ds[split].shuffle(seed=0).select(range(max_eval_samples))
    return ds


def training_split(ds, info, args):
    """The images and class counts the loss sees: the full LT train split, or LT-Soups' capped subset."""
    if args.balance_factor is None:
        return ds["train"], list(info.train_counts)
    require(args.balance_factor >= 1, f"--balance_factor must be >= 1, got {args.balance_factor}")
    return capped_subset(ds["train"], info.train_counts, args.balance_factor, seed=args.subset_seed)


def resolve_augment(args):
    """Head-only training trains on cached features of the eval view (the backbone runs once), so it cannot augment."""
    if args.method == "head":
        require(args.augment in (None, "none"), f"--augment {args.augment} does not apply to --method head: its features "
                "are computed once from the eval view; drop --augment")
        return "none"
    return args.augment or "rrc_flip"


def image_transforms(spec, augment="rrc_flip"):
    """(train, eval) transforms from the checkpoint's preprocessing.

    augment: rrc_flip (LIFT: RandomResizedCrop + flip), flip (the eval view, randomly mirrored; small images trained
    from scratch), none (the eval view).
    """
    from torchvision.transforms import v2

    common = dict(image_size=spec.image_size, mean=spec.image_mean, std=spec.image_std, interpolation=spec.interpolation)
    eval_tf = build_eval_transform(**common)
    train_tf = {"rrc_flip": lambda: build_train_transform(**common),
                "flip": lambda: v2.Compose([v2.RandomHorizontalFlip(), eval_tf]),
                "none": lambda: eval_tf}[augment]()
    return train_tf, eval_tf


def test_transform(spec, tte):
    common = dict(image_size=spec.image_size, mean=spec.image_mean, std=spec.image_std, interpolation=spec.interpolation)
    if tte == "none":
        return build_eval_transform(**common)
    return build_tte_transform(tte, patch_size=spec.patch_size, **common)


class SeededAugment:
    """Training augmentation drawn from (seed, epoch, sample id) instead of the global RNG.

    The same image gets the same crop whatever the number of processes or workers, however far the dataloader
    prefetches, and after a mid-epoch resume; so resumed and distributed runs reproduce single-process ones.
    Set `.epoch` before each epoch (workers are re-created per epoch and pick it up).
    """

    def __init__(self, transform, seed):
        self.transform, self.seed, self.epoch = transform, seed, 0

    def __call__(self, batch):
        pixel_values = []
        for image, sample_id in zip(batch["image"], batch["sample_id"]):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 100_000_007 + sample_id) % (2**62))
                pixel_values.append(self.transform(image))
        return {"pixel_values": pixel_values, "labels": [int(label) for label in batch["label"]]}


def with_sample_ids(dataset):
    return dataset.add_column("sample_id", list(range(len(dataset))))


def image_loader(dataset, transform, batch_size, num_workers, shuffle=False, sampler=None):
    """A loader of {"pixel_values", "labels"}; `transform` is a per-image transform or a batch transform (SeededAugment)."""
    batch_transform = transform if isinstance(transform, SeededAugment) else ApplyTransform(transform)
    return DataLoader(dataset.with_transform(batch_transform), batch_size=batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, num_workers=num_workers, collate_fn=collate, persistent_workers=False)


def build_sampler(args, train_ds):
    if args.sampler == "random":
        return None
    power = 0.0 if args.sampler == "class_balanced" else 0.5
    return ClassBalancedSampler(train_ds["label"], power=power, seed=args.seed)


def collate_features(items):
    features, labels = zip(*items)
    return {"pixel_values": torch.stack(features), "labels": torch.stack(labels)}


@torch.no_grad()
def cache_features(lt_model, loader, accelerator, desc):
    """Frozen-backbone features of a whole split, computed once (head-only training must not re-run the backbone)."""
    from tqdm.auto import tqdm

    lt_model.eval()
    feats, labels = [], []
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process):
        x = batch["pixel_values"]
        with accelerator.autocast():
            f = lt_model.features(x.flatten(0, 1)).view(*x.shape[:2], -1) if x.ndim == 5 else lt_model.features(x)
        f, y = accelerator.gather_for_metrics((f.float().contiguous(), batch["labels"]))
        feats.append(f.cpu())
        labels.append(y.cpu())
    return TensorDataset(torch.cat(feats), torch.cat(labels))


def feature_loader(features, batch_size, shuffle=False, sampler=None):
    return DataLoader(features, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      collate_fn=collate_features)


# ------------------------------------------------------------------------------------------------------ model
def method_args(args, num_classes, num_layers):
    r = args.adapter_dim or bottleneck_dim(num_classes, num_layers)
    return {"r": r, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
            "lora_target_modules": args.lora_target_modules}


def build_training_model(args, info, accelerator, head_init_loader_fn):
    """(model to train, LTModel inside it, head init tensor, init overrides, architecture) for this run."""
    num_classes = len(info.class_names)
    overrides, init_meta = None, None
    if args.init_from:
        require(args.method in INIT_FROM_METHODS,
                f"--init_from works with --method {'/'.join(INIT_FROM_METHODS)}, not {args.method}; train a fresh run instead")
        init_meta = read_export_meta(args.init_from)
        require(init_meta["id2label"] == {str(i): n for i, n in enumerate(info.class_names)},
                f"--init_from {args.init_from} was trained on other classes than --dataset {args.dataset}; use a matching export")
        # the backbone and head geometry come from the export, not from the flags
        args.model_name_or_path, args.from_scratch = init_meta["base_model"], init_meta["from_scratch"]
        args.head_type, args.head_scale = init_meta["head"]["type"], init_meta["head"]["scale"]
    lt_model = build_lt_model(args.model_name_or_path, num_classes, head_type=args.head_type, head_scale=args.head_scale,
                              from_scratch=args.from_scratch, seed=args.seed)
    margs = method_args(args, num_classes, lt_model.spec.num_layers)
    arch = {"adapters": None, "adapter_dim": None, "lora": None}
    if init_meta is not None:
        arch = {**init_meta["arch"], "lora": None}  # LoRA of the init export is merged into its weights
        if arch["adapters"] == "adaptformer":
            lt_model = apply_method(lt_model, "adaptformer", r=arch["adapter_dim"])
        overrides = export_overrides(args.init_from)
        load_overrides(lt_model, overrides, args.init_from)
        head_init = overrides["head.weight"].clone()
    else:
        head_init = initial_head(args, info, lt_model, accelerator, head_init_loader_fn)
    set_head_weight(lt_model, head_init)
    if args.method == "adaptformer":
        arch.update(adapters="adaptformer", adapter_dim=margs["r"])
    if args.method == "lora":
        arch["lora"] = {k: margs[k] for k in ("r", "lora_alpha", "lora_dropout", "lora_target_modules")}
    model = apply_method(lt_model, args.method, **(margs if args.method in ("adaptformer", "lora") else {}))
    return model, lt_model, head_init, overrides, arch


def initial_head(args, info, lt_model, accelerator, head_init_loader_fn):
    """Deterministic head init: the same inputs give the same head in every run (soups rely on it)."""
    num_classes, dim = len(info.class_names), lt_model.spec.hidden_size
    if args.head_init == "text":
        require(lt_model.spec.kind == "clip" and not args.from_scratch,
                "--head_init text needs a pretrained CLIP checkpoint; use --head_init class_mean or random")
        return text_head_init(args.model_name_or_path, info.class_names, prompts=args.prompt_template)
    if args.head_init == "class_mean":
        lt_model.to(accelerator.device)
        return class_mean_head_init(lt_model, head_init_loader_fn(lt_model.spec), num_classes).cpu()
    return random_head_init(num_classes, dim, seed=args.seed)


def build_optimizer(model, args):
    params = [p for p in model.parameters() if p.requires_grad]
    require(params, f"--method {args.method} left nothing to train")
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.learning_rate, momentum=args.momentum, weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.momentum, 0.999), weight_decay=args.weight_decay)


# ----------------------------------------------------------------------------------------------------- export
def export_meta(args, info, lt_model, arch, head_init):
    return {
        "base_model": args.model_name_or_path, "from_scratch": bool(args.from_scratch), "seed": args.seed,
        "backbone": lt_model.spec.to_dict(), "arch": arch, "method": args.method,
        "head": {"type": args.head_type, "scale": args.head_scale,
                 "init": "from " + str(args.init_from) if args.init_from else args.head_init,
                 "init_fingerprint": fingerprint(head_init)},
        "num_labels": len(info.class_names),
        "id2label": {str(i): n for i, n in enumerate(info.class_names)},
        "label2id": {n: i for i, n in enumerate(info.class_names)},
        "train_counts": list(info.train_counts), "groups": list(info.groups),
        "group_counts": info.group_counts(), "many_threshold": info.many_threshold, "few_threshold": info.few_threshold,
        "dataset": {"dataset": info.dataset, "imb": info.imb, "max_per_class": info.max_per_class,
                    "seed": info.seed, "selection": info.selection, "balance_factor": args.balance_factor,
                    # the local source files (eval_lt.py reads the same ones by default)
                    "data_dir": str(Path(args.data_dir).resolve()) if getattr(args, "data_dir", None) else None},
        "has_weights_file": True, "run_name": Path(args.output_dir).name,
    }


def gather_export_tensors(accelerator, train_model, lt_model, args, overrides):
    """Collective (every rank): the full state dict, gathered under ZeRO-3, reduced to what the export stores."""
    state_dict = accelerator.get_state_dict(train_model)
    if args.method == "head":
        full = {k: v for k, v in lt_model.state_dict().items()}
        full.update({f"head.{k}": v for k, v in state_dict.items()})
        state_dict = full
    if args.method == "lora":
        return state_dict, dict(overrides or {})
    if args.from_scratch:
        tensors = dict(state_dict)
    else:
        tensors = export_state_dict(state_dict, args.method)
    for key in overrides or {}:
        tensors.setdefault(key, state_dict[key])
    return state_dict, tensors


def save_export(export_dir, accelerator, train_model, lt_model, args, info, arch, head_init, overrides, metrics=None,
                image_processor=None):
    state_dict, tensors = gather_export_tensors(accelerator, train_model, lt_model, args, overrides)
    if not accelerator.is_main_process:
        return
    meta = export_meta(args, info, lt_model, arch, head_init)
    meta["has_weights_file"] = bool(tensors)
    peft_model, peft_sd = None, None
    if args.method == "lora":
        from peft import get_peft_model_state_dict

        peft_model = accelerator.unwrap_model(train_model)
        check_adapter_complete(get_peft_model_state_dict(peft_model, state_dict=state_dict), peft_model)
        peft_sd = state_dict  # save_pretrained selects the adapter (and head) from the full state dict itself
    head_init_tensors = {"weight": head_init}
    writers = [lambda d: info.save(Path(d) / "lt_info.json"),
               lambda d: (Path(d) / "README.md").write_text(model_card(meta, metrics or {}))]
    if metrics is not None:
        writers.append(lambda d: (Path(d) / "metrics.json").write_text(json.dumps(metrics, indent=2)))
    if image_processor is not None:
        writers.append(lambda d: image_processor.save_pretrained(str(d)))
    write_export(export_dir, meta, tensors, head_init_tensors, writers, peft_model=peft_model, peft_state_dict=peft_sd)


def check_adapter_complete(peft_sd, peft_model):
    """ZeRO-3 without a 16-bit gather writes empty adapters (hf_stack §14.2): compare numel with the trainable set."""
    saved = sum(v.numel() for v in peft_sd.values())
    trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in peft_model.parameters() if p.requires_grad)
    if saved < trainable:
        raise UserError(f"the adapter to export has {saved} values but {trainable} are trained; under DeepSpeed ZeRO-3 set "
                        "zero3_save_16bit_model: true in the accelerate config")


def load_image_processor(name_or_path):
    try:
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(name_or_path)
    except Exception:  # a config-only dir has none; the spec in lt_model.json still records mean/std/size
        return None



# ----------------------------------------------------------------------------------------- run bookkeeping
INPUT_PATH_FLAGS = (*DATA_INPUT_FLAGS, "init_from", "model_name_or_path")


def check_run_paths(args):
    """Before anything runs: the output dir is writable, apart from every input, and not an earlier run's unless
    resumed or --overwrite_output_dir is given."""
    from .fileio import check_outputs_apart, check_writable_dir

    check_writable_dir(args.output_dir, "--output_dir")
    if args.cache_dir:
        check_writable_dir(args.cache_dir, "--cache_dir")
    check_outputs_apart({"--output_dir": args.output_dir},
                        {f"--{flag}": getattr(args, flag, None) for flag in INPUT_PATH_FLAGS})
    out = Path(args.output_dir)
    if used_run_dir(out) and not args.resume_from_checkpoint and not args.overwrite_output_dir:
        raise UserError(f"--output_dir {out} already holds a run; pass --resume_from_checkpoint latest to continue it, "
                        "--overwrite_output_dir to replace it, or another --output_dir")


def used_run_dir(out):
    return out.is_dir() and any(p.name in ("final", "best", "log.txt") or p.name.startswith("step_") for p in out.iterdir())


# flags that do not change what a run trains (or are rewritten at start), not compared on a relaunch
_RELAUNCH_FREE = {"config", "resume_from_checkpoint", "overwrite_output_dir", "with_tracking", "report_to", "push_to_hub",
                  "hub_model_id", "hub_token", "num_workers", "per_device_eval_batch_size", "cache_dir", "augment",
                  "per_device_train_batch_size", "model_name_or_path", "from_scratch", "head_type", "head_scale",
                  "output_dir"}


def finished_run(args):
    """The results of a finished run being resumed (a requeued job): the relaunch is then a no-op. A relaunch with
    other settings would overwrite final/ with another model: refused."""
    out = Path(args.output_dir)
    path = out / "all_results.json"
    if not args.resume_from_checkpoint or not path.is_file():
        return None
    from .fileio import read_json

    saved_path = out / "config.yaml"
    if saved_path.is_file():
        import yaml

        try:
            saved = yaml.safe_load(saved_path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError):
            saved = {}
        for key, value in vars(args).items():
            if key in _RELAUNCH_FREE or key not in saved or saved[key] == value:
                continue
            raise UserError(f"cannot resume {out}, a finished run: its {key} is {saved[key]!r} but this run has "
                            f"{value!r}; relaunch it with the same settings (a no-op) or start a new --output_dir")
    return read_json(path, "results file")


def start_output_dir(args, accelerator, resumed_step=None):
    """After every check passed: make the output dir, clear the earlier run (--overwrite_output_dir), drop temp
    folders of killed saves, and cut log.txt back to the resumed step (those validations run again)."""
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if args.overwrite_output_dir and not args.resume_from_checkpoint:
            remove_previous_run(out)
        import shutil

        for tmp in out.glob(".step_*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
        if resumed_step is not None:
            truncate_log(out / "log.txt", resumed_step)
    accelerator.wait_for_everyone()


def truncate_log(path, step):
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:
            continue  # a line cut by a kill
    from .fileio import atomic_write_text

    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


RUN_FILES = ("final", "best", "log.txt", "all_results.json", "config.yaml")


def remove_previous_run(out):
    """--overwrite_output_dir: no export, checkpoint or log of the earlier run may pass for this one's."""
    import shutil

    for path in out.iterdir():
        if path.name in RUN_FILES or path.name.startswith(("step_", ".step_")):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def every_n_steps(value, plan, flag):
    """'epoch' -> steps per epoch; an integer string -> that many optimizer steps; None/'none' -> never."""
    if value is None or value == "none":
        return None
    if value == "epoch":
        return plan.steps_per_epoch
    return int(value)  # checked by the flag table


def resume_identity(args, info):
    """What a resumed run must share with the checkpoint: the exact training images, the classes and the model."""
    return {"dataset": info.dataset, "num_classes": len(info.class_names), "class_names": list(info.class_names),
            "train_images": info.index_hashes.get("train"), "method": args.method,
            "model_name_or_path": args.model_name_or_path, "balance_factor": args.balance_factor,
            "subset_seed": args.subset_seed, "adapter_dim": args.adapter_dim, "lora_alpha": args.lora_alpha,
            "lora_target_modules": args.lora_target_modules, "head_type": args.head_type, "init_from": args.init_from}


def non_finite_advice(args):
    """What may have made the loss non-finite: the flags of this run that scale the logits, the loss or the steps."""
    causes = [f"--learning_rate {args.learning_rate:g}"]
    if args.head_type == "cosine":
        causes.append(f"--head_scale {args.head_scale:g}")
    if args.loss == "la":
        causes.append(f"--tau {args.tau:g}")
    if args.max_grad_norm is not None:
        causes.append(f"--max_grad_norm {args.max_grad_norm:g}")
    if args.mixed_precision == "fp16":
        causes.append("--mixed_precision fp16")
    fix = "lower the one you raised" + ("" if args.max_grad_norm is not None else ", or set --max_grad_norm (e.g. 1.0)")
    return f"check {', '.join(causes)}: {fix}"


def log_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def describe_run(args, accelerator, plan, num_examples, trainable):
    total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    lines = ["***** Running training *****", f"  Num examples = {num_examples}", f"  Num epochs = {plan.num_epochs}",
             f"  Per-device batch size = {args.per_device_train_batch_size}",
             f"  Total batch size (per device x processes x accumulation) = {total_batch}",
             f"  Gradient accumulation steps = {args.gradient_accumulation_steps}",
             f"  Total optimization steps = {plan.total_steps}", f"  Trainable parameters = {trainable:,}"]
    return "\n".join(lines)


def refresh_model_card(export_dir, metrics):
    from .checkpoint import META_FILE
    from .fileio import atomic_write_text

    from .fileio import read_json

    meta = read_json(Path(export_dir) / META_FILE, "export metadata")
    atomic_write_text(Path(export_dir) / "README.md", model_card(meta, metrics))
