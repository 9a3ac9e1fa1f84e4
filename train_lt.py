"""Fine-tune CLIP / ViT on long-tailed data: LIFT (PEFT), LT-Soups ingredients (full FT), LOS / LT-Soups stage 2 (head).

  # offline demo on CPU (Fashion-MNIST-LT, a tiny ViT from scratch)
  python train_lt.py --config configs/quickstart_fashion_mnist.yaml
  # LIFT on CIFAR-100-LT, one GPU; effective batch 128 from 4 x 32
  accelerate launch train_lt.py --config configs/lift_cifar100_lt.yaml --gradient_accumulation_steps 4
  # several GPUs / DeepSpeed ZeRO-2 (ViT-L/14@336 full fine-tuning)
  accelerate launch --config_file accelerate_configs/multi_gpu.yaml train_lt.py --dataset cifar100_lt --imb 100
  accelerate launch --config_file accelerate_configs/ds_zero2.yaml train_lt.py \
      --config configs/ltsoups_stage1_full.yaml \
      --model_name_or_path openai/clip-vit-large-patch14-336
"""
import logging
from pathlib import Path

from lt_utils.config import parse_train_args
from lt_utils.errors import UserError, cli_entry

logger = logging.getLogger("lt")


@cli_entry
def main(argv=None):
    # everything is checked (flags, paths, the resumed spec, data, model, resume state) before the output dir is touched
    values = parse_train_args(argv)
    # the training stack (torch, transformers, accelerate, datasets) once the flags are parsed, so --help and flag
    # errors answer in about a second (the loop itself is lt_utils/run_loop.py)
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from lt_utils import data_loaders as D
    from lt_utils import training as T
    from lt_utils.checkpoint import check_resume_identity, register_trainable_only_hooks
    from lt_utils.compile import keep_eager_state_keys
    from lt_utils.engine import EMA, NonFiniteLoss, TrainState, linear_warmup_cosine
    from lt_utils.fileio import atomic_write_json
    from lt_utils.losses import LossOptions, build_loss
    from lt_utils.peft_methods import trainable_parameter_count
    from lt_utils.protocols import PROTOCOLS, paper_row, row_label
    from lt_utils.reports import describe_outputs, format_markdown_table
    from lt_utils.run_loop import (Run, check_push, eval_every, export, load_resume_state, push_results, run_epochs,
                                   test_exports, with_ema)
    from lt_utils.schedule import plan_steps
    from lt_utils.spec import describe_changes, flat_record

    spec = T.resolve_run_spec(values, T.launch_processes())
    data, model_spec, loss, optim, output = spec.data, spec.model, spec.loss, spec.optim, spec.output
    T.check_run_paths(spec)
    hub_repo = check_push(spec)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if (done := T.finished_run(spec)) is not None:  # a requeued finished run: nothing to train, nothing overwritten
        if hub_repo is not None:  # but its push may have failed: pushed now, once
            print(f"{output.output_dir} already finished (all_results.json); nothing to train")
            push_results(output, done, hub_repo)
            return done
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
        D.k_shot(ds["train"], shots, model_spec.seed), D.head_init_transform(backbone), data.per_device_eval_batch_size, 0)
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
        train_feats, val_feats = cache(train_ds, "train"), cache(ds["validation"], "validation")
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
        val_loader = D.image_loader(ds["validation"], eval_tf, data.per_device_eval_batch_size, data.num_workers)
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

    test_loader = accelerator.prepare(D.image_loader(ds["test"], D.test_transform(lt_model.spec, data),
                                                     data.per_device_eval_batch_size, data.num_workers))
    has_val = len(ds["validation"]) > 0
    ctx = Run(spec=spec, accelerator=accelerator, info=info, train_model=train_model, exporter=exporter,
              val_loader=val_loader, test_loader=test_loader, ema=ema, state=state, plan=plan, resume_changes=resume_changes,
              batch_transform=batch_transform, has_val=has_val,
              eval_every=eval_every(spec.eval, plan) if has_val or PROTOCOLS.get(spec.eval.protocol).test_each_eval
              else None,
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
    results = test_exports(ctx)
    rows, protocol = list(results), spec.eval.protocol
    results.update(protocol=protocol, paper_row=paper_row(protocol, rows))
    if accelerator.is_main_process:
        atomic_write_json(Path(output.output_dir) / "all_results.json", results)
        print(format_markdown_table({row_label(name, protocol, rows, results[name].get("step")): results[name]["test"]
                                     for name in rows}))
        print(f"paper row ({protocol}: {PROTOCOLS.get(protocol).what}): {results['paper_row']}")
        print(describe_outputs(output.output_dir))
    if hub_repo is not None:
        push_results(output, results, hub_repo)
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
