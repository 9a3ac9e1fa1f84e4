"""The set-up steps of train_lt.py, one function each: accelerator, model, optimizer, run bookkeeping.

Data and loaders: data_loaders.py; export writing: exports.py."""
import contextlib
import json
import logging
from pathlib import Path

import torch

from .checkpoint import load_export
from .compile import dynamo_plugin
from .config import DATA_INPUT_FLAGS, SECRET_FLAGS
from .errors import UserError, require
from .exports import Exporter
from .head_init import HEAD_INITS, set_head_weight
from .heads import fingerprint
from .models import build_lt_model, enable_gradient_checkpointing, lt_config
from .peft_methods import METHODS, apply_method, empty_arch, head_parameter_count, trainable_parameter_count


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
        dynamo_plugin=dynamo_plugin(args),
        **cpu_multiprocess_kwargs(),
    )
    if accelerator.num_processes > 1 and accelerator.distributed_type == DistributedType.NO:
        raise UserError("several processes but no distributed backend; on CPU set ACCELERATE_USE_CPU=1 (DDP) or "
                        "ACCELERATE_USE_DEEPSPEED=true with a DeepSpeed config")
    check_fp16(accelerator)
    check_deepspeed_accumulation(accelerator, args)
    check_zero3_export(accelerator, args)
    fill_deepspeed_clipping(accelerator, args)
    return accelerator


def check_fp16(accelerator):
    """fp16 is LIFT's precision: autocast + a GradScaler (accelerate's, on GPU; DeepSpeed scales its own loss). On CPU
    accelerate would silently train in fp32 instead: refuse."""
    if accelerator.mixed_precision == "fp16" and accelerator.state.deepspeed_plugin is None and accelerator.scaler is None:
        raise UserError(f"--mixed_precision fp16 needs a GPU (autocast + GradScaler); on {accelerator.device.type} "
                        "accelerate would train in fp32: use --mixed_precision bf16 or no")


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
    """accelerate silently takes DeepSpeed's accumulation when the two disagree, so the run would not be the one
    asked for: refuse instead."""
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


# ------------------------------------------------------------------------------------------------------ model
def build_training_model(args, info, accelerator, head_init_loader_fn):
    """(model to train, Exporter holding the LTModel inside it and the exports' config)."""
    num_classes = len(info.class_names)
    method = METHODS.get(args.method)
    if args.init_from:
        allowed = [name for name in METHODS if METHODS.get(name).init_from]
        require(method.init_from,
                f"--init_from works with --method {'/'.join(allowed)}, not {args.method}; train a fresh run instead")
        lt_model, init = load_export(args.init_from)  # the whole model from its folder (LoRA merged), a Hub id too
        require(init["id2label"] == {str(i): n for i, n in enumerate(info.class_names)},
                f"--init_from {args.init_from} was trained on other classes than --dataset {args.dataset}; use a matching export")
        # the backbone and head geometry come from the export, not from the flags
        args.model_name_or_path, args.from_scratch = init["base_model"], init["from_scratch"]
        args.head_type, args.head_scale = init["head"]["type"], init["head"]["scale"]
        lt_model = with_interpolation(lt_model, args)
        arch = dict(init["arch"])
        head_init = lt_model.head.weight.detach().clone()
    else:
        lt_model = with_interpolation(build_lt_model(args.model_name_or_path, num_classes, head_type=args.head_type,
                                                     head_scale=args.head_scale, from_scratch=args.from_scratch,
                                                     seed=args.seed), args)
        arch = empty_arch()
        head_init = HEAD_INITS.get(args.head_init)(args, info, lt_model, accelerator, head_init_loader_fn)
    set_head_weight(lt_model, head_init)
    margs = method.method_args(args, num_classes, lt_model.spec.num_layers)
    arch.update(method.arch(margs))
    model = apply_method(lt_model, args.method, **margs)
    if args.gradient_checkpointing:
        require(not method.head_only, f"--gradient_checkpointing does not apply to --method {args.method} (its backbone "
                "runs once without gradients); drop it")
        enable_gradient_checkpointing(lt_model)
    config = lt_config(
        lt_model, info.class_names, args.head_type, args.head_scale, arch,
        head_init={"init": "from " + str(args.init_from) if args.init_from else args.head_init,
                   "init_fingerprint": fingerprint(head_init)},
        lt_info=info.to_dict(), base_model=args.model_name_or_path, from_scratch=args.from_scratch, seed=args.seed,
        method=args.method, run={"balance_factor": args.balance_factor, "run_name": Path(args.output_dir).name,
                                 "hub_model_id": getattr(args, "hub_model_id", None),
                                 # the local source files (eval_lt.py reads the same ones by default)
                                 "data_dir": str(Path(args.data_dir).resolve()) if getattr(args, "data_dir", None) else None})
    lora_config = model.peft_config["default"] if method.peft else None
    return model, Exporter(config, lt_model, head_init, args.method, lora_config)


def with_interpolation(lt_model, args):
    """--interpolation replaces the processor's for every transform of the run; the export records it (eval_lt.py)."""
    if getattr(args, "interpolation", None):
        lt_model.spec.interpolation = args.interpolation
    return lt_model


def check_bn_flags(args, num_processes):
    """--head_features / --backbone_bn / --sync_bn apply to some runs only; say so before anything runs."""
    if args.head_features == "augmented":
        require(METHODS.get(args.method).head_only,
                f"--head_features augmented applies to --method head, not {args.method}; drop it")
    else:
        require(args.backbone_bn == "eval" or not METHODS.get(args.method).head_only,
                "--backbone_bn train needs --head_features augmented (cached features are computed once in eval mode)")
    require(args.backbone_bn == "eval" or args.head_features == "augmented",
            "--backbone_bn applies to --method head --head_features augmented only; drop it")


def setup_batchnorm(args, accelerator, model, lt_model):
    """The frozen backbone's BatchNorm mode (--backbone_bn) and --sync_bn across processes."""
    from .batchnorm import convert_sync_batchnorm, has_batchnorm

    lt_model.backbone_eval = METHODS.get(args.method).head_only and args.backbone_bn == "eval"
    if args.sync_bn:
        require(has_batchnorm(lt_model), f"--sync_bn: the {lt_model.spec.kind} backbone has no BatchNorm; drop --sync_bn")
        if accelerator.num_processes > 1:
            convert_sync_batchnorm(lt_model)  # in place: the LTModel root is no BatchNorm, keys are unchanged
    elif accelerator.num_processes > 1 and has_batchnorm(lt_model) and not lt_model.backbone_eval:
        # not an error: per-process statistics are what plain DDP does, but results then depend on the process count
        if accelerator.is_main_process:
            logging.getLogger("lt").warning(
                f"BatchNorm trains on {accelerator.num_processes} processes without --sync_bn: each normalises over "
                f"its own {args.per_device_train_batch_size} images, so results differ from one process with the "
                "global batch; pass --sync_bn to normalise over the global batch")
    return model


def build_optimizer(model, args):
    params = [p for p in model.parameters() if p.requires_grad]
    require(params, f"--method {args.method} left nothing to train")
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.learning_rate, momentum=args.momentum, weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.momentum, 0.999), weight_decay=args.weight_decay)


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
                  "hub_model_id", "num_workers", "gradient_checkpointing", "torch_compile", "torch_compile_backend",
                  "torch_compile_mode", "per_device_eval_batch_size", "cache_dir", "augment", "augment_on_device",
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
            if key in _RELAUNCH_FREE or key in SECRET_FLAGS or key not in saved or saved[key] == value:
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
            "subset_seed": args.subset_seed, "subset_selection": args.subset_selection, "adapter_dim": args.adapter_dim, "lora_alpha": args.lora_alpha,
            "lora_target_modules": args.lora_target_modules, "head_type": args.head_type, "init_from": args.init_from,
            "head_features": args.head_features, "backbone_bn": args.backbone_bn,
            **{k: getattr(args, k) for k, default in METHOD_FLAG_DEFAULTS.items() if getattr(args, k) != default}}


# flags that shape a method's modules, with their defaults: part of a resume's identity when set (so checkpoints
# written before the flags existed still resume)
METHOD_FLAG_DEFAULTS = {"partial_layers": None, "vpt_len": 10, "mask_ratio": None, "mask_seed": 0, "lora_init": "peft"}


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
             f"  Total optimization steps = {plan.total_steps}", f"  Trainable parameters = {trainable:,}",
             f"  Processes = {accelerator.num_processes} ({accelerator.distributed_type.value}), "
             f"mixed precision = {accelerator.mixed_precision}"]
    return "\n".join(lines)


def dry_run(args, accelerator, model, lt_model, num_examples):
    """--dry_run: the run header, then (last line of stdout) a JSON object of the trainable parameter counts."""
    import math

    from .schedule import plan_steps

    batches = math.ceil(num_examples / (args.per_device_train_batch_size * accelerator.num_processes))
    plan = plan_steps(batches, args.gradient_accumulation_steps, args.num_train_epochs, args.max_train_steps,
                      args.min_train_steps)
    trainable, head = trainable_parameter_count(model), head_parameter_count(model)
    counts = {"method": args.method, "trainable": trainable, "head": head, "backbone": trainable - head,
              "backbone_kind": lt_model.spec.kind, "total": sum(p.numel() for p in model.parameters()), "total_steps": plan.total_steps}
    if accelerator.is_main_process:
        print(describe_run(args, accelerator, plan, num_examples, trainable).replace("Running training", "Dry run"))
        print(json.dumps(counts), flush=True)
    return counts
