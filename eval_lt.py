"""Evaluate exports (train_lt.py's final/ or best/, soups, Hub ids) or a zero-shot CLIP / SigLIP on a long-tailed split.

Reports top-1, mean per-class, many / medium / few, macro-F1, worst-class accuracy and NLL; writes metrics.json,
per_class.csv and per_class_accuracy.png per run and prints one markdown table for all of them. Exact on any number of
processes (predictions are gathered with gather_for_metrics, so padding duplicates are dropped).

  # the split the run was trained on (recorded with the export); a run dir means its best/ (else final/)
  python eval_lt.py outputs/run --split test
  # LIFT's five-crop test-time ensembling on several GPUs
  accelerate launch --config_file accelerate_configs/multi_gpu.yaml eval_lt.py outputs/run/final --tte fivecrop
  # two CPU processes (tests, no GPU): torchrun, with accelerate told to use the CPU
  ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 eval_lt.py outputs/run/final
  # runs, a soup and the zero-shot CLIP in one table (comparison.md)
  python eval_lt.py runs/a runs/b soups/lt --zero_shot openai/clip-vit-base-patch16 --output_dir results/cifar100_lt
  # zero-shot alone needs the dataset; 80-template prompt ensemble
  python eval_lt.py --zero_shot openai/clip-vit-base-patch16 --prompt_template ensemble --dataset cifar100_lt --imb 100
  # an export on the Hub, on the validation split, other group thresholds
  python eval_lt.py user/clip-vit-b16-cifar100-lt --split validation --many_threshold 50 --few_threshold 10
"""
import argparse
import json
import logging

from lt_utils.config import (DATA_INPUT_FLAGS, ArgumentParser, add_compile_args, add_data_args, add_flags,
                             resolve_cross_flags)
from lt_utils.errors import cli_entry, require
from lt_utils.paths import expand

logger = logging.getLogger("lt")


def get_args_parser():
    parser = ArgumentParser(
        description="Long-tail evaluation (many/medium/few) of export dirs, Hub ids or a zero-shot CLIP / SigLIP.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("runs", nargs="*", metavar="RUN", type=expand,
                        help="an export dir, a run dir (its best/, else final/) or a Hub id; several give one table")
    add_flags(parser, ("which", "split", "zero_shot", "prompt_template", "prompt_descriptor_file", "output_dir",
                       "overwrite", "save_predictions", "top_k", "mixed_precision"), output_dir=None)
    add_compile_args(parser)
    group = add_data_args(parser)
    group.description = ("default: the split each export was trained on (its config.json records it, and its --data_dir); only the "
                         "flags you pass override it, e.g. --data_dir for other local source files")
    return parser


@cli_entry
def main(argv=None):
    parser = get_args_parser()
    args = argparse.Namespace(**resolve_cross_flags(vars(parser.parse_args(argv))))
    # torch, transformers, accelerate and datasets once the flags are parsed (--help answers without them); each
    # function below imports what it uses the same way
    from accelerate import Accelerator

    from lt_utils import data_loaders as D
    from lt_utils import eval_runs as E
    from lt_utils.compile import dynamo_plugin
    from lt_utils.fileio import atomic_write_text
    from lt_utils.prompts import check_prompt_args
    from lt_utils.reports import format_markdown_table
    from lt_utils.spec import CompileSpec, DataSpec

    passed = E.passed_flags(parser, argv, E.RECORDED_FLAGS)
    require(args.runs or args.zero_shot, "nothing to evaluate; pass export dirs, run dirs or Hub ids, or --zero_shot")
    require(args.runs or "dataset" in passed, "--zero_shot alone needs --dataset (and its flags); no export records it")
    E.check_split(args.split)
    check_prompt_args(args.prompt_template, args.prompt_descriptor_file)
    accelerator = Accelerator(mixed_precision=args.mixed_precision,
                              dynamo_plugin=dynamo_plugin(CompileSpec.from_values(vars(args))))
    E.check_launch(accelerator)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.ERROR)

    # every input and output is checked before the first (long) evaluation starts
    targets = E.build_targets(args.runs, args.zero_shot, args.prompt_template, args.which)
    comparison = E.assign_output_dirs(targets, args.output_dir, args.split, D.tte_tag(DataSpec.from_values(vars(args))),
                                      args.overwrite,
                                      {f"--{flag}": getattr(args, flag) for flag in DATA_INPUT_FLAGS})
    accelerator.wait_for_everyone()
    loaded = {}
    data = [target_data(target, targets[0], args, passed, accelerator, loaded) for target in targets]
    results = {target.name: evaluate_target(target, args, *target_data, accelerator)
               for target, target_data in zip(targets, data)}
    if accelerator.is_main_process:
        table = format_markdown_table(results)
        print(table)
        if comparison is not None:
            atomic_write_text(comparison, table)
            logger.info(f"table saved to {comparison}")
    accelerator.end_training()
    return results


def target_data(target, first, args, passed, accelerator, loaded):
    """(data flags, DatasetDict, LTInfo) a target is evaluated on, its labels checked against the dataset's."""
    from lt_utils import eval_runs as E

    # zero-shot next to exports runs on the first export's split
    data_args = E.data_args_for(args, target.recorded or first.recorded, passed)
    ds, info = load_split(data_args, accelerator, loaded)
    if target.meta is not None:
        E.check_labels(target.meta, info.class_names, target.name, info.dataset)
        E.warn_if_other_split(target, info, args.split)
    return data_args, ds, info


def load_split(data_args, accelerator, loaded):
    """(DatasetDict, LTInfo with the thresholds of data_args), loaded once per distinct set of data flags."""
    from lt_utils import data_loaders as D
    from lt_utils import eval_runs as E
    from lt_utils.spec import DataSpec

    key = json.dumps(vars(data_args), sort_keys=True, default=str)
    if key not in loaded:
        ds, info = D.load_data(DataSpec.from_values(vars(data_args)), accelerator)
        ds = D.limit_eval_splits(ds, data_args.max_eval_samples)
        E.check_split(data_args.split, ds, info.dataset)
        loaded[key] = ds, info.with_thresholds(data_args.many_threshold, data_args.few_threshold)
    return loaded[key]


def evaluate_target(target, args, data_args, ds, info, accelerator):
    from lt_utils import data_loaders as D
    from lt_utils import eval_runs as E
    from lt_utils.checkpoint import load_export
    from lt_utils.engine import evaluate
    from lt_utils.metrics import with_split_groups
    from lt_utils.spec import DataSpec

    if target.zero_shot:
        from lt_utils.zeroshot import build_zero_shot

        model = build_zero_shot(target.zero_shot, info.class_names, args.prompt_template,
                                device=accelerator.device, descriptor_file=args.prompt_descriptor_file)
        spec = model.spec
    else:
        model, _ = load_export(target.export_dir)
        spec = model.spec
    model.to(accelerator.device)
    if args.torch_compile:
        model = accelerator.prepare_model(model, evaluation_mode=True)
    loader = D.image_loader(ds[args.split], D.test_transform(spec, DataSpec.from_values(vars(args))),
                            args.per_device_eval_batch_size, args.num_workers)
    loader = accelerator.prepare(loader)
    top_k = args.top_k if args.save_predictions else 0
    with accelerator.autocast():
        metrics = evaluate(model, loader, accelerator, info.groups, info.num_classes, desc=target.slug, top_k=top_k)
    metrics, predictions = metrics if top_k else (metrics, None)
    metrics = with_split_groups(metrics, info)
    if accelerator.is_main_process:
        config = E.eval_config(target, args, data_args, info, accelerator.mixed_precision)
        E.write_outputs(target, config, metrics, info, args.overwrite, predictions)
        if E.record_on_export(target, args.split, metrics, info, D.tte_tag(DataSpec.from_values(vars(args))),
                              args.max_eval_samples):
            logger.info(f"{target.name}: {args.split} numbers added to its metrics.json and model card (README.md)")
        logger.info(f"{target.name}: {args.split} top-1 {metrics['accuracy']:.2f}, mean-class "
                    f"{metrics['mean_class_acc']:.2f} on {accelerator.num_processes} processes; "
                    f"outputs in {target.output_dir}")
    accelerator.wait_for_everyone()
    return metrics


if __name__ == "__main__":
    main()
