"""Fine-tune CLIP / ViT on long-tailed data: LIFT (PEFT), LT-Soups ingredients (full FT), LOS / LT-Soups stage 2 (head).

  # offline demo on CPU (Fashion-MNIST-LT, a tiny ViT from scratch)
  python train_lt.py --config configs/quickstart_fashion_mnist.yaml
  # LIFT on CIFAR-100-LT, one GPU; effective batch 128 from 4 x 32
  accelerate launch train_lt.py --config configs/lift_cifar100_lt.yaml --gradient_accumulation_steps 4
  # several GPUs / DeepSpeed ZeRO-2 (ViT-L/14@336 full fine-tuning)
  accelerate launch --config_file accelerate_configs/multi_gpu.yaml train_lt.py --dataset cifar100_lt --imb 100
  accelerate launch --config_file accelerate_configs/ds_zero2.yaml --mixed_precision bf16 train_lt.py \
      --config configs/ltsoups_stage1_full.yaml \
      --model_name_or_path openai/clip-vit-large-patch14-336
"""
import copy
import dataclasses
import logging
import os
from pathlib import Path

from lt_utils.config import parse_train_args
from lt_utils.errors import UserError, cli_entry

logger = logging.getLogger("lt")


def _import_training():
    """The training stack (torch, transformers, accelerate, datasets), imported once the flags are parsed, so --help
    and flag errors answer in about a second; bound as this script's globals, where the functions below find them."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from lt_utils import data_loaders as D
    from lt_utils import training as T
    from lt_utils.checkpoint import (check_finite, checkpoint_dir, check_resume_identity, load_export,
                                     register_trainable_only_hooks, tensor_bytes, write_resume_record)
    from lt_utils.compile import keep_eager_state_keys
    from lt_utils.engine import EMA, NonFiniteLoss, TrainState, evaluate, linear_warmup_cosine, train_one_epoch
    from lt_utils.fileio import atomic_write_json, read_json, replace_dir
    from lt_utils.paths import guard_write, remove
    from lt_utils.losses import LossOptions, build_loss
    from lt_utils.metrics import scalar_metrics, selection_score, with_split_groups
    from lt_utils.exports import Exporter, refresh_model_card
    from lt_utils.peft_methods import trainable_parameter_count
    from lt_utils.reports import format_markdown_table
    from lt_utils.schedule import eval_interval, plan_steps
    from lt_utils.spec import RunSpec, describe_changes, flat_record

    globals().update(locals())


@cli_entry
def main(argv=None):
    # everything is checked (flags, paths, the resumed spec, data, model, resume state) before the output dir is touched
    values = parse_train_args(argv)
    _import_training()
    spec = T.resolve_run_spec(values, T.launch_processes())
    data, model_spec, loss, optim, output = spec.data, spec.model, spec.loss, spec.optim, spec.output
    T.check_run_paths(spec)
    if output.push_to_hub:
        from lt_utils.hub import check_adapter_push
        from lt_utils.peft_methods import METHODS

        check_adapter_push(output.hub_push, METHODS.get(spec.method.method).peft, model_spec.model_name_or_path)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if (done := T.finished_run(spec)) is not None:  # a requeued finished run: nothing to do, nothing overwritten
        print(f"{output.output_dir} already finished (all_results.json); nothing to do. To train again pass "
              "--overwrite_output_dir without --resume_from_checkpoint, or another --output_dir")
        return done
    resume = T.check_resume(spec)
    accelerator = T.build_accelerator(spec)
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.ERROR)
    set_seed(model_spec.seed)

    # data
    ds, info = D.load_data(data, accelerator)
    ds = D.limit_eval_splits(ds, data.max_eval_samples)
    D.check_splits(ds, info.dataset, spec.method)  # before --overwrite_output_dir removes anything
    train_ds, train_counts = D.training_split(ds, info, loss)
    # class means from the full train split, also for a capped ingredient: every soup ingredient gets the same head init
    head_init_loader = lambda backbone, shots=None: D.image_loader(
        D.k_shot(ds["train"], shots, model_spec.seed), D.image_transforms(backbone)[1], data.per_device_eval_batch_size, 0)
    # model
    with T.plain_model_init(accelerator):
        model, exporter = T.build_training_model(spec, info, accelerator, head_init_loader)
    lt_model = exporter.lt_model
    if output.dry_run:
        return T.dry_run(spec, accelerator, model, lt_model, len(train_ds))
    model = T.setup_batchnorm(spec.method, optim, accelerator, model, lt_model)
    train_tf, eval_tf = D.image_transforms(lt_model.spec, loss.augment)
    loss_fn = build_loss(loss.loss, train_counts, LossOptions.from_spec(loss, model_spec.head_scale))
    sampler = D.build_sampler(loss.sampler, train_ds, model_spec.seed)
    if D.head_on_cached_features(spec.method):  # stage 2, fast: the frozen backbone runs once per split, the head trains on the cache
        lt_model.to(accelerator.device)
        cache = lambda split, name: D.cache_features(lt_model, accelerator.prepare(
            D.image_loader(split, eval_tf, data.per_device_eval_batch_size, data.num_workers)), accelerator, f"features {name}")
        train_feats, val_feats = cache(train_ds, "train"), cache(ds["val"], "val")
        train_loader = D.feature_loader(train_feats, optim.per_device_train_batch_size, shuffle=True, sampler=sampler)
        val_loader = D.feature_loader(val_feats, data.per_device_eval_batch_size)
        train_model, augment, batch_transform = lt_model.head, None, None
    else:  # the model end to end (--method head --head_features augmented: the frozen backbone runs every step)
        train_tf, batch_transform = D.on_device_augment(loss.augment_on_device, train_tf)
        augment = D.SeededAugment(train_tf, model_spec.seed)
        train_loader = D.image_loader(train_ds, augment, optim.per_device_train_batch_size,
                                      data.num_workers, True, sampler)
        if batch_transform is not None:
            D.check_on_device_augment(train_loader)
        val_loader = D.image_loader(ds["val"], eval_tf, data.per_device_eval_batch_size, data.num_workers)
        train_model = model
    optimizer = T.build_optimizer(train_model, optim)
    train_model, optimizer, train_loader, val_loader = accelerator.prepare(train_model, optimizer, train_loader, val_loader)
    train_model = keep_eager_state_keys(train_model)  # --torch_compile: resume states and exports keep eager names

    plan = plan_steps(len(train_loader), optim.gradient_accumulation_steps, optim.num_train_epochs, optim.max_train_steps,
                      optim.min_train_steps)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    ema = EMA(train_model, optim.ema_decay, optim.ema_start) if optim.ema_decay else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    if accelerator.state.deepspeed_plugin is None:
        register_trainable_only_hooks(accelerator)
    resumed_step, resume_changes, logged_change = None, (), None
    if resume is not None:
        check_resume_identity(resume.path, T.resume_identity(info))
        load_resume_state(accelerator, resume, train_model, optimizer)
        state.last_good_checkpoint, resumed_step = str(resume.path), state.completed_steps
        resume_changes = resume.earlier_changes
        if resume.changes:
            logged_change = T.change_record(resumed_step, resume.changes)
            resume_changes = (*resume_changes, logged_change)
            logger.warning(f"Resumed with flags changed since the checkpoint (--resume_allow_changes): "
                           f"{describe_changes(resume.changes)}")
        logger.info(f"Resumed from {resume.path} at optimizer step {state.completed_steps}")
    T.start_output_dir(output, accelerator, resumed_step)
    T.record_run(spec, accelerator, resume_changes, logged_change)
    if output.with_tracking:
        accelerator.init_trackers("train_lt", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                      for k, v in flat_record(spec.record()).items()})
    logger.info(T.describe_run(optim, accelerator, plan, len(train_ds), trainable_parameter_count(train_model)))

    ctx = Run(spec=spec, accelerator=accelerator, info=info, train_model=train_model, exporter=exporter,
              val_loader=val_loader, ema=ema, state=state, plan=plan, resume_changes=resume_changes,
              batch_transform=batch_transform, eval_every=eval_every(spec.eval, plan) if len(ds["val"]) else None,
              ckpt_every=T.every_n_steps(output.checkpointing_steps, plan, "--checkpointing_steps"))
    schedule = linear_warmup_cosine(optim, plan)
    progress = tqdm(total=plan.total_steps, initial=state.completed_steps, desc="train",
                    disable=not accelerator.is_local_main_process)
    try:
        # the root logger's handler is the one that prints (logger "lt" propagates to it): redirect that one, or each
        # line would be printed twice, by tqdm's handler and by the root's
        with logging_redirect_tqdm():
            run_epochs(ctx, train_loader, optimizer, loss_fn, schedule, progress, augment)
    except NonFiniteLoss as err:
        progress.close()
        last = state.last_good_checkpoint or "none (set --checkpointing_steps)"
        raise UserError(f"{err}; training stopped, nothing exported, last good checkpoint: {last}; "
                        f"{T.non_finite_advice(spec)}") from None
    progress.close()

    with_ema(ctx, lambda: export(ctx, "final"))
    results = test_exports(ctx, ds["test"], lt_model.spec)
    if accelerator.is_main_process:
        atomic_write_json(Path(output.output_dir) / "all_results.json", results)
        print(format_markdown_table({f"{name} (test)": r["test"] for name, r in results.items()}))
    if output.push_to_hub and accelerator.is_main_process:
        from lt_utils.hub import push_export

        repo = push_export(Path(output.output_dir) / ("best" if "best" in results else "final"),
                           output.hub_model_id or Path(output.output_dir).name, token=output.hub_token,
                           what=output.hub_push)
        logger.info(f"Pushed to https://huggingface.co/{repo}")
    accelerator.end_training()
    return results


@dataclasses.dataclass
class Run:
    """The training loop's state shared by the functions below (the export side is in `exporter`)."""

    spec: "RunSpec"
    accelerator: object
    info: object  # LTInfo of the data
    train_model: object  # the prepared model (or head, for --method head) the optimizer steps
    exporter: "Exporter"
    val_loader: object
    ema: object  # engine.EMA or None
    state: "TrainState"
    plan: object  # schedule.StepPlan
    resume_changes: tuple = ()  # the flag changes resumes of this run were allowed (recorded in every checkpoint)
    batch_transform: object = None  # --augment_on_device: finishes each training batch on the accelerator
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
        with_ema(ctx, lambda: validate(ctx, step))
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


def validate(ctx, step):
    a = ctx.accelerator
    metrics = evaluate(ctx.train_model, ctx.val_loader, a, ctx.info.groups, len(ctx.info.class_names), desc="val")
    a.log({f"val/{k}": v for k, v in scalar_metrics(metrics).items()}, step=step)
    if a.is_main_process:
        T.log_jsonl(Path(ctx.spec.output.output_dir) / "log.txt", {"step": step, **{f"val_{k}": v for k, v in metrics.items()
                                                                         if not isinstance(v, list)}})
        logger.info(f"step {step}: val acc {metrics['accuracy']:.2f}  mean-class {metrics['mean_class_acc']:.2f}")
    score = selection_score(metrics, ctx.spec.eval.select_metric)
    if score is not None and score > ctx.state.best_metric:
        ctx.state.best_metric, ctx.state.best_step = score, step
        export(ctx, "best", {"val": metrics, "step": step})


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


def test_exports(ctx, test_ds, spec):
    """Evaluate best/ and final/ on the test split, reloaded from disk exactly as eval_lt.py would."""
    a, data, results = ctx.accelerator, ctx.spec.data, {}
    loader = a.prepare(D.image_loader(test_ds, D.test_transform(spec, data), data.per_device_eval_batch_size,
                                      data.num_workers))
    for name in ("best", "final"):
        export_dir = Path(ctx.spec.output.output_dir) / name
        if not export_dir.is_dir():
            continue
        with T.plain_model_init(a):
            model, _ = load_export(export_dir)
        model.to(a.device)
        with a.autocast():
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


if __name__ == "__main__":
    main()
