"""The set-up steps of train_lt.py, one function each: the run spec, accelerator, model, optimizer, run bookkeeping
and resume. Each takes the parts of the spec (spec.py) it needs.

Data and loaders: data_loaders.py; export writing: exports.py."""
import contextlib
import dataclasses
import json
import logging
from pathlib import Path

import torch

from .checkpoint import (CONVERT_COMMAND, EXPORT_FORMAT, earlier_format, load_export, read_export_config,
                         read_resume_record, resolve_resume_path)
from .compile import dynamo_plugin
from .config import INPUT_PATH_FLAGS, TRAIN_FLAGS
from .data_loaders import head_on_cached_features, resolve_augment
from .errors import UserError, require
from .exports import Exporter
from .fileio import recorded_path
from .head_init import HEAD_INITS, set_head_weight
from .heads import build_head, fingerprint
from .models import build_lt_model, enable_gradient_checkpointing, lt_config
from .peft_methods import METHODS, apply_method, head_parameter_count, trainable_parameter_count
from .prompts import check_prompt_args
from .protocols import PROTOCOLS, RUN_ROWS
from .schedule import check_optim_flags, check_schedule_flags
from .spec import MethodSpec, RunSpec, changed_flags, describe_changes, flat_record, method_config_of


# -------------------------------------------------------------------------------------------------- the spec
def resolve_run_spec(values, num_processes):
    """THE spec of a run, built once from the parsed flags (config.parse_train_args): --total_batch_size becomes the
    per-device batch, --augment its default, --init_from gives the backbone and head geometry; then the constraints
    between flags are checked. Nothing changes it afterwards."""
    values = {**values,
              "per_device_train_batch_size": per_device_batch_size(
                  values["total_batch_size"], values["per_device_train_batch_size"],
                  values["gradient_accumulation_steps"], num_processes),
              "augment": resolve_augment(values["augment"], values["augment_on_device"],
                                         head_on_cached_features(MethodSpec.from_values(values))),
              **init_from_model(values["init_from"])}
    spec = RunSpec.from_values(values)
    check_schedule_flags(spec.eval)
    check_optim_flags(spec.optim)
    check_prompt_args(spec.model.prompt_template, spec.model.prompt_descriptor_file)
    check_bn_flags(spec.method)
    check_protocol(spec.eval)
    check_partial(spec.method)
    check_init_from_flags(spec.model)
    return spec


def check_partial(method):
    """LIFT's classifier-only rows (partial = 0: no block tuned, augmented images every step) are a method here."""
    require(method.partial_layers != 0, "--partial_layers 0 tunes no block: LIFT's classifier-only fine-tuning is "
            "--method head --head_features augmented (drop --partial_layers)")


def check_protocol(evaluation):
    """--protocol best_test tests at each validation, so it needs validations."""
    protocol = PROTOCOLS.get(evaluation.protocol)
    require(not protocol.test_each_eval or evaluation.num_evals or str(evaluation.eval_steps) != "none",
            f"--protocol {evaluation.protocol} tests at each validation, and --eval_steps is none: pass --eval_steps "
            "epoch (LOS) or pick another --protocol")


def per_device_batch_size(total_batch_size, per_device, accumulation, num_processes):
    """--total_batch_size = per-device batch x accumulation x processes; it must divide exactly."""
    require(accumulation >= 1, "--gradient_accumulation_steps must be >= 1")
    if total_batch_size is None:
        return per_device
    denom = accumulation * num_processes
    require(total_batch_size % denom == 0,
            f"--total_batch_size {total_batch_size} is not divisible by gradient_accumulation_steps x processes "
            f"= {accumulation} x {num_processes}; pick an accumulation that divides it")
    return total_batch_size // denom


def init_from_model(init_from):
    """--init_from: the backbone and head geometry come from the export's record, not from the flags."""
    if not init_from:
        return {}
    config = read_export_config(init_from)  # a Hub id: its local snapshot, reused by the model build
    return {"model_name_or_path": config.base_model, "from_scratch": config.from_scratch,
            "head_type": config.head_type, "head_scale": config.head_scale}


def reset_accelerate():
    """Forget accelerate's process-wide state, so one process can run several entry-script mains one after another
    (scripts/reproduce.py's rows; the tests' in-process command lines)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def launch_processes():
    """The number of processes of this launch, before the Accelerator exists (--total_batch_size needs it):
    accelerate's process state, started with the arguments build_accelerator gives it, which then finds it started."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    kwargs = cpu_multiprocess_kwargs()
    state_kwargs = {k: v for handler in kwargs.get("kwargs_handlers", ()) for k, v in handler.to_kwargs().items()}
    return PartialState(kwargs.get("cpu", False) or parse_flag_from_env("ACCELERATE_USE_CPU"),
                        **state_kwargs).num_processes


# ----------------------------------------------------------------------------------------------- accelerator
def build_accelerator(spec):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedType

    optim, output = spec.optim, spec.output
    accelerator = Accelerator(
        gradient_accumulation_steps=optim.gradient_accumulation_steps,
        mixed_precision=optim.mixed_precision,
        log_with=output.report_to if output.with_tracking else None,
        project_dir=output.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        dynamo_plugin=dynamo_plugin(spec.compile),
        **cpu_multiprocess_kwargs(),
    )
    if accelerator.num_processes > 1 and accelerator.distributed_type == DistributedType.NO:
        raise UserError("several processes but no distributed backend; on CPU set ACCELERATE_USE_CPU=1 (DDP) or "
                        "ACCELERATE_USE_DEEPSPEED=true with a DeepSpeed config")
    check_fp16(accelerator)
    check_deepspeed_accumulation(accelerator, optim)
    check_zero3_export(accelerator, optim)
    fill_deepspeed_clipping(accelerator, optim)
    return accelerator


def check_fp16(accelerator):
    """fp16 is LIFT's precision: autocast + a GradScaler (accelerate's, on GPU; DeepSpeed scales its own loss). On CPU
    accelerate would silently train in fp32 instead: refuse."""
    if accelerator.mixed_precision == "fp16" and accelerator.state.deepspeed_plugin is None and accelerator.scaler is None:
        raise UserError(f"--mixed_precision fp16 needs a GPU (autocast + GradScaler); on {accelerator.device.type} "
                        "accelerate would train in fp32: use --mixed_precision bf16 or no")


def check_zero3_export(accelerator, optim):
    """Under ZeRO-3 an export needs the 16-bit gather, and parameters are partitioned (an EMA copy would hold empty
    tensors): refuse at start rather than fail, or silently mix EMA and raw weights, after training."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        return
    if optim.ema_decay:
        raise UserError("--ema_decay does not work under DeepSpeed ZeRO-3 (parameters are partitioned); use ZeRO-2 "
                        "(accelerate_configs/ds_zero2.yaml) or drop --ema_decay")
    if plugin.deepspeed_config.get("zero_optimization", {}).get("stage3_gather_16bit_weights_on_model_save") is not True:
        raise UserError("DeepSpeed ZeRO-3 without stage3_gather_16bit_weights_on_model_save: true cannot export complete "
                        "weights; set zero3_save_16bit_model: true under deepspeed_config in the accelerate config (as "
                        "accelerate_configs/ds_zero3.yaml does)")


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


def fill_deepspeed_clipping(accelerator, optim):
    """accelerate fills DeepSpeed's 'auto' gradient_clipping with 1.0; make it --max_grad_norm (0: none) instead."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.deepspeed_config.get("gradient_clipping") == "auto":
        plugin.deepspeed_config["gradient_clipping"] = float(optim.max_grad_norm or 0.0)


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


def check_deepspeed_accumulation(accelerator, optim):
    """accelerate silently takes DeepSpeed's accumulation when the two disagree, so the run would not be the one
    asked for: refuse instead."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    steps = optim.gradient_accumulation_steps
    ds_steps = plugin.deepspeed_config.get("gradient_accumulation_steps")
    if ds_steps not in (None, "auto") and int(ds_steps) != steps:
        raise UserError(f"DeepSpeed config has gradient_accumulation_steps={ds_steps} but --gradient_accumulation_steps="
                        f"{steps}; set one of them so they agree (or 'auto' in the DeepSpeed config)")
    if accelerator.gradient_accumulation_steps != steps:
        raise UserError(f"accelerate uses gradient_accumulation_steps={accelerator.gradient_accumulation_steps} but "
                        f"--gradient_accumulation_steps={steps}; make the accelerate config agree")


# ------------------------------------------------------------------------------------------------------ model
def build_training_model(spec, info, accelerator, head_init_loader_fn):
    """(model to train, Exporter holding the LTModel inside it and the exports' config)."""
    num_classes = len(info.class_names)
    method = METHODS.get(spec.method.method)
    if spec.model.init_from:
        allowed = [name for name in METHODS if METHODS.get(name).init_from]
        require(method.init_from, f"--init_from works with --method {'/'.join(allowed)}, not {spec.method.method}; "
                "train a fresh run instead")
        lt_model, init = load_export(spec.model.init_from)  # the whole model from its folder (LoRA merged); a Hub id too
        same_classes = init["id2label"] == {str(i): n for i, n in enumerate(info.class_names)}
        require(same_classes or spec.model.ignore_mismatched_sizes,
                f"--init_from {spec.model.init_from} was trained on other classes than --dataset {spec.data.dataset}; "
                "use a matching export, or pass --ignore_mismatched_sizes to keep its backbone with a new head")
        # the backbone and head geometry come from the export (init_from_model put them in the spec)
        lt_model = with_interpolation(lt_model, spec.data.interpolation)
        base = init["method_config"]  # the modules it holds are rebuilt from its record
        # the export's head stays as it is, weight and bias (LOS's stage 2 fine-tunes the stage-1 bias too), unless
        # it classifies other classes (transformers' ignore_mismatched_sizes: dropped for a new one)
        kept_head = same_classes
        if not kept_head:
            m = spec.model
            lt_model.head = build_head(m.head_type, num_classes, lt_model.head.weight.shape[1], scale=m.head_scale,
                                       seed=m.seed)
    else:
        m = spec.model
        lt_model = with_interpolation(build_lt_model(m.model_name_or_path, num_classes, head_type=m.head_type,
                                                     head_scale=m.head_scale, from_scratch=m.from_scratch, seed=m.seed,
                                                     image_size=m.image_size,
                                                     trust_remote_code=spec.data.trust_remote_code),
                                      spec.data.interpolation)
        base, kept_head = None, False
    if kept_head:
        head_init = lt_model.head.weight.detach().clone()
    else:
        head_init = HEAD_INITS.get(spec.model.head_init)(spec.model, info, lt_model, accelerator, head_init_loader_fn)
        set_head_weight(lt_model, head_init)
    method_config = method_config_of(spec.method, num_classes, lt_model.spec.num_layers)
    model = apply_method(lt_model, method_config)
    if spec.optim.gradient_checkpointing:
        require(not method.head_only, f"--gradient_checkpointing does not apply to --method {spec.method.method} (its "
                "backbone runs once without gradients); drop it")
        enable_gradient_checkpointing(lt_model)
    m = spec.model
    config = lt_config(
        lt_model, info.class_names, m.head_type, m.head_scale,
        head_init={"init": "from " + str(recorded_path(m.init_from)) if kept_head else m.head_init,
                   "init_fingerprint": fingerprint(head_init)},
        lt_info=info.to_dict(), base_model=recorded_path(m.model_name_or_path), from_scratch=m.from_scratch,
        seed=m.seed, method={**method_config.to_record(), **({"base": base} if base else {})},
        run={"balance_factor": spec.loss.balance_factor, "run_name": Path(spec.output.output_dir).name,
             "hub_model_id": spec.output.hub_model_id,
             # the local source files (eval_lt.py reads the same ones by default)
             "data_dir": str(Path(spec.data.data_dir).resolve()) if spec.data.data_dir else None})
    lora_config = model.peft_config["default"] if method.peft else None
    return model, Exporter(config, lt_model, head_init, spec.method.method, lora_config)


def with_interpolation(lt_model, interpolation):
    """--interpolation replaces the processor's for every transform of the run; the export records it (eval_lt.py)."""
    if interpolation:
        lt_model.spec.interpolation = interpolation
    return lt_model


def check_init_from_flags(model):
    """--ignore_mismatched_sizes is about --init_from's head; --image_size would be ignored by it (the export's size)."""
    require(model.init_from or not model.ignore_mismatched_sizes,
            "--ignore_mismatched_sizes applies to --init_from (an export trained on other classes); drop it")
    require(not (model.init_from and model.image_size), f"--image_size {model.image_size} does not apply to --init_from "
            "(the export's image size is kept); drop it")


def check_bn_flags(method):
    """--head_features / --backbone_bn (a spec.MethodSpec) apply to some runs only; say so before anything runs."""
    head_only = METHODS.get(method.method).head_only
    if method.head_features == "augmented":
        require(head_only, f"--head_features augmented applies to --method head, not {method.method}; drop it")
    else:
        require(method.backbone_bn == "eval" or not head_only,
                "--backbone_bn train needs --head_features augmented (cached features are computed once in eval mode)")
    require(method.backbone_bn == "eval" or method.head_features == "augmented",
            "--backbone_bn applies to --method head --head_features augmented only; drop it")


def setup_batchnorm(method, optim, accelerator, model, lt_model):
    """The frozen backbone's BatchNorm mode (--backbone_bn) and --sync_bn across processes."""
    from .batchnorm import convert_sync_batchnorm, has_batchnorm

    lt_model.backbone_eval = METHODS.get(method.method).head_only and method.backbone_bn == "eval"
    if optim.sync_bn:
        require(has_batchnorm(lt_model), f"--sync_bn: the {lt_model.spec.kind} backbone has no BatchNorm; drop --sync_bn")
        if accelerator.num_processes > 1:
            convert_sync_batchnorm(lt_model)  # in place: the LTModel root is no BatchNorm, keys are unchanged
    elif accelerator.num_processes > 1 and has_batchnorm(lt_model) and not lt_model.backbone_eval:
        # not an error: per-process statistics are what plain DDP does, but results then depend on the process count
        if accelerator.is_main_process:
            logging.getLogger("lt").warning(
                f"BatchNorm trains on {accelerator.num_processes} processes without --sync_bn: each normalises over "
                f"its own {optim.per_device_train_batch_size} images, so results differ from one process with the "
                "global batch; pass --sync_bn to normalise over the global batch")
    return model


def build_optimizer(model, optim):
    """--optimizer over the trainable parameters, from a spec.OptimSpec."""
    params = [p for p in model.parameters() if p.requires_grad]
    require(params, "the method left nothing to train; check --method and --partial_layers")
    if optim.optimizer == "sgd":
        return torch.optim.SGD(params, lr=optim.learning_rate, momentum=optim.momentum, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(params, lr=optim.learning_rate, betas=(optim.momentum, 0.999),
                             weight_decay=optim.weight_decay)


# ----------------------------------------------------------------------------------------- run bookkeeping
RUN_SPEC_FILE = "run_spec.json"


def check_run_paths(spec):
    """Before anything runs: the output dir is writable, apart from every input, and not an earlier run's unless
    resumed or --overwrite_output_dir is given."""
    from .checkpoint import recorded_inputs
    from .paths import check_output, check_outputs_apart

    output, values = spec.output, spec.values()
    if spec.data.cache_dir:
        check_output(spec.data.cache_dir, "--cache_dir", lock=False)
    check_outputs_apart({"--output_dir": output.output_dir},
                        {**{f"--{flag}": values[flag] for flag in INPUT_PATH_FLAGS if flag in values},
                         **recorded_inputs(values.get("init_from"), "--init_from")})
    check_output(output.output_dir, "--output_dir")  # held until the run ends: one run per output dir at a time
    out = Path(output.output_dir)
    if used_run_dir(out) and not output.resume_from_checkpoint and not output.overwrite_output_dir:
        raise UserError(f"--output_dir {out} already holds a run; pass --resume_from_checkpoint latest to continue it, "
                        "--overwrite_output_dir to replace it, or another --output_dir")


def used_run_dir(out):
    return out.is_dir() and any(p.name in ("final", "best", "log.txt") or p.name.startswith("step_") for p in out.iterdir())


_CHANGE_FIX = "pass --resume_allow_changes to continue anyway, or start a new --output_dir"


def finished_run(spec):
    """The results of a finished run being resumed (a requeued job): the relaunch is then a no-op. A relaunch that
    changes what is trained (the comparison a resume makes) would overwrite final/ with another model: refused, or with
    --resume_allow_changes trained on from the latest checkpoint (None)."""
    from .fileio import read_json

    out = Path(spec.output.output_dir)
    path = out / "all_results.json"
    if not spec.output.resume_from_checkpoint or not path.is_file():
        return None
    recorded = recorded_run_spec(out)
    changes = changed_flags(recorded, spec) if recorded is not None else {}
    if changes and spec.output.resume_allow_changes:
        return None
    if changes:
        raise UserError(f"cannot resume {out}, a finished run: flags changed since it ran ({describe_changes(changes)}); "
                        f"relaunch with the same flags (a no-op), {_CHANGE_FIX}")
    return read_json(path, "results file")


def recorded_run_spec(out):
    """The flat spec a run dir records: run_spec.json, else (runs recorded before it) config.yaml; None if neither
    can be read."""
    import yaml

    from .fileio import read_json

    try:
        return flat_record(read_json(out / RUN_SPEC_FILE, "run record")["run_spec"])
    except (UserError, KeyError, TypeError):
        pass
    try:
        saved = yaml.safe_load((out / "config.yaml").read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return saved if isinstance(saved, dict) else None


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run resumes from and how its flags differ from the checkpoint's."""

    path: Path
    changes: dict  # {flag: (checkpoint's value, this run's)}: flags that may not change, allowed by --resume_allow_changes
    earlier_changes: tuple  # the changes earlier resumes of the run were allowed


def check_resume(spec):
    """--resume_from_checkpoint: the checkpoint, its recorded spec compared with this one as a whole, before anything
    runs. Flags that may not change (config.RESUME_FREE_FLAGS are the others) and differ are refused in one line
    naming each, unless --resume_allow_changes. The data identity is checked once the data is loaded."""
    output = spec.output
    if not output.resume_from_checkpoint:
        return None
    check_current_exports(Path(output.output_dir))
    path = resolve_resume_path(output.resume_from_checkpoint, output.output_dir)
    record = read_resume_record(path)
    if isinstance(record.get("run_spec"), dict):
        recorded = flat_record(record["run_spec"])
    else:  # written before the spec was recorded: the flags its identity held, beside the data's
        recorded = {**flat_record(spec.record()), **{k: v for k, v in record.items() if k in TRAIN_FLAGS and k != "dataset"}}
    changes = changed_flags(recorded, spec)
    if changes and not output.resume_allow_changes:
        raise UserError(f"cannot resume from {path}: flags changed since the checkpoint ({describe_changes(changes)}); "
                        f"relaunch with the same flags, {_CHANGE_FIX}")
    return ResumePoint(path, changes, tuple(record.get("resume_changes") or ()))


def check_current_exports(out):
    """A resumed run tests its exports at the end, kept ones too: an export an earlier version wrote there (another
    format) would be refused only then, after the training, so the resume is refused now."""
    for name in RUN_ROWS:
        fmt = earlier_format(out / name)
        if fmt is not None:
            raise UserError(f"cannot resume {out}: its {name}/ was written by an earlier version ({fmt}; this version "
                            f"writes {EXPORT_FORMAT}); start a new --output_dir (convert {name}/ with {CONVERT_COMMAND} "
                            "to keep it)")


def change_record(step, changes):
    """A resume's allowed changes as recorded (log.txt, run_spec.json, the next checkpoints)."""
    return {"step": step, "resume_changes": {name: [old, new] for name, (old, new) in changes.items()}}


def record_run(spec, accelerator, resume_changes=(), logged_change=None):
    """The run dir's record of this (re)start, on the main process: config.yaml (the flat flags, re-usable as a
    preset), run_spec.json (the spec and the changes resumes were allowed) and, for a resume with changes, a log.txt
    line naming them."""
    from .config import save_resolved_config
    from .fileio import atomic_write_json

    if not accelerator.is_main_process:
        return
    out = Path(spec.output.output_dir)
    save_resolved_config(flat_record(spec.record()), out / "config.yaml")
    atomic_write_json(out / RUN_SPEC_FILE, {"run_spec": spec.record(), "resume_changes": list(resume_changes)})
    if logged_change is not None:
        log_jsonl(out / "log.txt", logged_change)


def start_output_dir(output, accelerator, resumed_step=None):
    """After every check passed: make the output dir, clear the earlier run (--overwrite_output_dir), drop temp
    folders of killed saves, and cut log.txt back to the resumed step (those validations run again)."""
    out = Path(output.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if output.overwrite_output_dir and not output.resume_from_checkpoint:
            remove_previous_run(out)
        from .paths import remove

        for tmp in out.glob(".step_*.tmp"):
            remove(tmp)
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


RUN_FILES = (*RUN_ROWS, "log.txt", "all_results.json", "config.yaml", RUN_SPEC_FILE)


def remove_previous_run(out):
    """--overwrite_output_dir: no export, checkpoint or log of the earlier run may pass for this one's."""
    from .paths import remove

    for path in out.iterdir():
        if path.name in RUN_FILES or path.name.startswith(("step_", ".step_")):
            remove(path)  # a symlinked step_* is unlinked, its target kept


def every_n_steps(value, plan, flag):
    """'epoch' -> steps per epoch; an integer string -> that many optimizer steps; None/'none' -> never."""
    if value is None or value == "none":
        return None
    if value == "epoch":
        return plan.steps_per_epoch
    return int(value)  # checked by the flag table


def resume_identity(info):
    """What a resumed run must share with the checkpoint beyond its flags (the spec): the exact training images and
    the classes."""
    return {"dataset": info.dataset, "num_classes": len(info.class_names), "class_names": list(info.class_names),
            "train_images": info.index_hashes.get("train")}


def non_finite_advice(spec):
    """What may have made the loss non-finite: the flags of this run that scale the logits, the loss or the steps."""
    optim = spec.optim
    causes = [f"--learning_rate {optim.learning_rate:g}"]
    if spec.model.head_type == "cosine":
        causes.append(f"--head_scale {spec.model.head_scale:g}")
    if spec.loss.loss == "la":
        causes.append(f"--tau {spec.loss.tau:g}")
    if optim.max_grad_norm is not None:
        causes.append(f"--max_grad_norm {optim.max_grad_norm:g}")
    if optim.mixed_precision == "fp16":
        causes.append("--mixed_precision fp16")
    fix = "lower the one you raised" + ("" if optim.max_grad_norm is not None else ", or set --max_grad_norm (e.g. 1.0)")
    return f"check {', '.join(causes)}: {fix}"


def log_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def describe_run(optim, accelerator, plan, num_examples, trainable):
    total_batch = optim.per_device_train_batch_size * accelerator.num_processes * optim.gradient_accumulation_steps
    lines = ["***** Running training *****", f"  Num examples = {num_examples}", f"  Num epochs = {plan.num_epochs}",
             f"  Per-device batch size = {optim.per_device_train_batch_size}",
             f"  Total batch size (per device x processes x accumulation) = {total_batch}",
             f"  Gradient accumulation steps = {optim.gradient_accumulation_steps}",
             f"  Total optimization steps = {plan.total_steps}", f"  Trainable parameters = {trainable:,}",
             f"  Processes = {accelerator.num_processes} ({accelerator.distributed_type.value}), "
             f"mixed precision = {accelerator.mixed_precision}"]
    return "\n".join(lines)


def dry_run(spec, accelerator, model, lt_model, num_examples):
    """--dry_run: the run header, then (last line of stdout) a JSON object of the trainable parameter counts."""
    import math

    from .schedule import plan_steps

    optim = spec.optim
    batches = math.ceil(num_examples / (optim.per_device_train_batch_size * accelerator.num_processes))
    plan = plan_steps(batches, optim.gradient_accumulation_steps, optim.num_train_epochs, optim.max_train_steps,
                      optim.min_train_steps)
    trainable, head = trainable_parameter_count(model), head_parameter_count(model)
    counts = {"method": spec.method.method, "trainable": trainable, "head": head, "backbone": trainable - head,
              "backbone_kind": lt_model.spec.kind, "total": sum(p.numel() for p in model.parameters()), "total_steps": plan.total_steps}
    if accelerator.is_main_process:
        print(describe_run(optim, accelerator, plan, num_examples, trainable).replace("Running training", "Dry run"))
        print(json.dumps(counts), flush=True)
    return counts
