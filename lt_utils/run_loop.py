"""The training loop of train_lt.py: epochs, validation and keeping the best exports, checkpoints, the final test.

`train_lt.main` builds a `Run` (data, model, loaders, state) and hands it to `run_epochs`; every function here takes
that one context.
"""
import contextlib
import copy
import dataclasses
import logging
import math
import os
from pathlib import Path

from accelerate import PartialState

from . import data_loaders as D
from . import training as T
from .checkpoint import check_finite, checkpoint_dir, load_export, tensor_bytes, write_resume_record
from .engine import evaluate, train_one_epoch
from .errors import UserError
from .exports import refresh_model_card
from .hub import check_adapter_push, check_hub_push, push_once, push_repo_id
from .methods import METHODS
from .paths import guard_write, remove
from .fileio import atomic_write_json, read_json, replace_dir
from .metrics import scalar_metrics, selection_score, with_split_groups
from .protocols import PROTOCOLS, RUN_ROWS
from .schedule import eval_interval

logger = logging.getLogger("lt")


@dataclasses.dataclass
class Run:
    """The training loop's state shared by the functions below (the export side is in `exporter`)."""

    spec: object  # spec.RunSpec
    accelerator: object
    info: object  # LTInfo of the data
    train_model: object  # the prepared model (or head, for --method head) the optimizer steps
    exporter: object  # exports.Exporter
    val_loader: object
    test_loader: object  # the test view of the test split (--tte), prepared
    ema: object  # engine.EMA or None
    state: object  # engine.TrainState
    plan: object  # schedule.StepPlan
    resume_changes: tuple = ()  # the flag changes resumes of this run were allowed (recorded in every checkpoint)
    batch_transform: object = None  # --augment_on_device: finishes each training batch on the accelerator
    has_val: bool = True  # without a validation split only --protocol best_test evaluates (on test)
    eval_every: int = None
    ckpt_every: int = None


def run_epochs(ctx, train_loader, optimizer, loss_fn, schedule, progress, augment):
    """The epoch loop from wherever the state says (a resume starts mid-epoch, skipping the batches already seen)."""
    optim, accelerator, state, plan = ctx.spec.optim, ctx.accelerator, ctx.state, ctx.plan
    if state.completed_steps >= plan.total_steps:  # resumed at (or after) the last step: no step more
        return
    for epoch in range(state.completed_steps // plan.steps_per_epoch, plan.num_epochs):
        train_loader.set_epoch(epoch)
        if augment is not None:
            augment.epoch = epoch
        skip = plan.batches_to_skip(state.completed_steps, optim.gradient_accumulation_steps)
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        loss = train_one_epoch(ctx.train_model, loader, optimizer, loss_fn, accelerator, state, schedule,
                               max_grad_norm=optim.max_grad_norm, ema=ctx.ema, progress=progress,
                               batch_transform=ctx.batch_transform,
                               on_step=lambda step: on_step(ctx, step))
        accelerator.log({"train/epoch_loss": loss, "train/epoch": epoch + 1}, step=state.completed_steps)
        if state.completed_steps >= plan.total_steps:
            break


def eval_every(evaluation, plan):
    """Validation interval in optimizer steps: --num_evals (LT-Soups' 5 per run) or --eval_steps."""
    if evaluation.num_evals is None:
        return T.every_n_steps(evaluation.eval_steps, plan, "--eval_steps")
    return eval_interval(evaluation.num_evals, plan.total_steps)


def on_step(ctx, step):
    """After each optimizer step: validate (keeping the best export) and save resume states on their intervals.
    The last step is validated too, except under --num_evals, whose schedule is LT-Soups' exactly."""
    at_end = step == ctx.plan.total_steps and ctx.spec.eval.num_evals is None
    if ctx.eval_every and (step % ctx.eval_every == 0 or at_end):
        protocol = PROTOCOLS.get(ctx.spec.eval.protocol)
        if ctx.has_val:
            with_ema(ctx, lambda: validate(ctx, step))
        if ctx.has_val and protocol.raw_exports and ctx.ema is not None:  # LT-Soups selects the raw weights on validation too
            validate(ctx, step, "best_raw")
        if protocol.test_each_eval:  # LOS keeps the epoch that tests best (the model it reports)
            with_ema(ctx, lambda: keep_best_test(ctx, step))
    if ctx.ckpt_every and step % ctx.ckpt_every == 0:
        save_checkpoint(ctx, step)
    return step >= ctx.plan.total_steps


def with_ema(ctx, fn):
    """Run fn with the EMA weights swapped in (LT-Soups evaluates and keeps the EMA model)."""
    if ctx.ema is not None:
        ctx.ema.swap(ctx.train_model)
    try:
        return fn()
    finally:
        if ctx.ema is not None:
            ctx.ema.swap(ctx.train_model)


def validate(ctx, step, name="best"):
    """Validate the model as it is now; keep it as `name`/ when it beats that export's best score."""
    a, tag = ctx.accelerator, "validation" + name[len("best"):]  # validation, validation_raw
    metrics = evaluate(ctx.train_model, ctx.val_loader, a, ctx.info.groups, len(ctx.info.class_names), desc=tag)
    a.log({f"{tag}/{k}": v for k, v in scalar_metrics(metrics).items()}, step=step)
    if a.is_main_process:
        T.log_jsonl(Path(ctx.spec.output.output_dir) / "log.txt", {"step": step, **{f"{tag}_{k}": v for k, v in metrics.items()
                                                                         if not isinstance(v, list)}})
        logger.info(f"step {step}: {tag} acc {metrics['accuracy']:.2f}  mean-class {metrics['mean_class_acc']:.2f}")
    keep_if_better(ctx, name, step, metrics, {"validation": metrics, "step": step})


def keep_best_test(ctx, step):
    """--protocol best_test: test now and keep best_test/ when it beats every earlier test score (optimistic)."""
    # a head trained on cached features is tested inside its model, on images. This picks the model in the training
    # forward's precision; the row reported is best_test/ reloaded and tested as the other exports (test_exports)
    model = ctx.exporter.lt_model if D.head_on_cached_features(ctx.spec.method) else ctx.train_model
    metrics = evaluate(model, ctx.test_loader, ctx.accelerator, ctx.info.groups, len(ctx.info.class_names), desc="test")
    keep_if_better(ctx, "best_test", step, metrics, {"step": step, "selected_on": "test"})


def keep_if_better(ctx, name, step, metrics, record):
    score, state = selection_score(metrics, ctx.spec.eval.select_metric), ctx.state
    best = state.best_metric if name == "best" else state.kept.get(name, [-math.inf])[0]
    if score is None or score <= best:
        return
    if name == "best":
        state.best_metric, state.best_step = score, step
    else:
        state.kept[name] = [score, step]
    export(ctx, name, record)


def export(ctx, name, metrics=None):
    ctx.exporter.save(Path(ctx.spec.output.output_dir) / name, ctx.accelerator, ctx.train_model, metrics)
    ctx.accelerator.wait_for_everyone()


def save_checkpoint(ctx, step):
    """Resume state written to a temp name and renamed: an interrupted save never looks like a checkpoint."""
    a, final = ctx.accelerator, checkpoint_dir(ctx.spec.output.output_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if a.is_main_process and os.path.lexists(tmp):  # left by a killed save
        remove(tmp)
    a.wait_for_everyone()
    # weights and two optimizer moments of what trains; a full disk mid-save leaves no partial step_*
    with guard_write(final, 3 * tensor_bytes(p for p in ctx.train_model.parameters() if p.requires_grad),
                     cleanup=lambda: remove(tmp) if a.is_main_process else None):
        a.save_state(str(tmp))
        a.wait_for_everyone()  # every rank writes its own RNG state (and ZeRO shard) into tmp: all must finish first
        if a.is_main_process:
            write_resume_record(tmp, T.resume_identity(ctx.info), ctx.spec.record(), ctx.resume_changes)
            replace_dir(tmp, final)  # a run resumed from an earlier step writes this step again
    a.wait_for_everyone()
    ctx.state.last_good_checkpoint = str(final)


def load_resume_state(accelerator, resume, train_model, optimizer):
    """accelerator.load_state, with unreadable or non-finite states refused in one line. Flags changed under
    --resume_allow_changes set the optimizer's hyperparameters (another --optimizer starts without the checkpoint's
    moments, which are another optimizer's)."""
    path, changed = resume.path, resume.changes and accelerator.state.deepspeed_plugin is None
    fresh = copy.deepcopy(optimizer.state_dict()) if changed else None  # no step yet: hyperparameters only
    try:
        # trainable-only states load non-strictly; DeepSpeed writes complete ZeRO shards (and takes no `strict`)
        accelerator.load_state(str(path), **({} if accelerator.state.deepspeed_plugin else {"strict": False}))
    except UserError:
        raise
    except Exception as err:  # truncated, empty or garbage files of a checkpoint: the user picks another one
        raise UserError(f"checkpoint {path} cannot be loaded ({err.__class__.__name__}); resume from an earlier step_* "
                        "folder or delete this one") from None
    check_finite({n: p for n, p in train_model.named_parameters() if p.requires_grad}, f"checkpoint {path}",
                 "resume from an earlier step_* folder or delete this one")
    if fresh is not None and "optimizer" in resume.changes:
        optimizer.load_state_dict(fresh)
    elif fresh is not None:
        for group, new in zip(optimizer.param_groups, fresh["param_groups"]):
            group.update({k: v for k, v in new.items() if k != "params"})


def test_precision(ctx):
    """--test_precision: the run's autocast, or fp32 whatever the training precision (LIFT)."""
    return contextlib.nullcontext() if ctx.spec.eval.test_precision == "fp32" else ctx.accelerator.autocast()


def test_exports(ctx):
    """Evaluate the run's exports (best/, final/ and the protocol's) on the test split, reloaded from disk exactly as
    eval_lt.py would."""
    a, data, results, loader = ctx.accelerator, ctx.spec.data, {}, ctx.test_loader
    for name in RUN_ROWS:
        export_dir = Path(ctx.spec.output.output_dir) / name
        if not export_dir.is_dir():
            continue
        with T.plain_model_init(a):
            model, _ = load_export(export_dir)
        model.to(a.device)
        with test_precision(ctx):
            test = with_split_groups(evaluate(model, loader, a, ctx.info.groups, len(ctx.info.class_names),
                                              desc=f"test {name}"), ctx.info)
        saved = read_json(export_dir / "metrics.json", "metrics") if (export_dir / "metrics.json").is_file() else {}
        results[name] = {**saved, "test": test, "tte": D.tte_tag(data)}
        a.log({f"test_{name}/{k}": v for k, v in scalar_metrics(test).items()},
              step=ctx.state.completed_steps)
        if a.is_main_process:
            atomic_write_json(export_dir / "metrics.json", results[name])
            refresh_model_card(export_dir, results[name])
        a.wait_for_everyone()
    return results


def check_push(spec):
    """--push_to_hub, before any compute: what is pushed exists for this method, and the Hub repo, created now (on the
    main process, which pushes at the end). Returns the repo's full id there, else None."""
    output = spec.output
    if not output.push_to_hub:
        return None
    check_adapter_push(output.hub_push, METHODS.get(spec.method.method).peft, spec.model.model_name_or_path)
    if not PartialState().is_main_process:
        return None
    return check_hub_push(push_repo_id(output.hub_model_id, output.output_dir), output.hub_token)


def push_results(output, results, repo):
    """best/ (else final/) to the Hub, unless hub_push.json records this very export pushed there already."""
    export = Path(output.output_dir) / ("best" if "best" in results else "final")
    url = push_once(output.output_dir, export, repo, output.hub_token, output.hub_push)
    print(f"pushed {export} to https://huggingface.co/{repo} ({url})" if url else
          f"{export} is on the Hub already (https://huggingface.co/{repo}, recorded in hub_push.json); nothing to push")
