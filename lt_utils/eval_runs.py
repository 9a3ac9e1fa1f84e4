"""What eval_lt.py evaluates and where it writes: RUN arguments -> export dirs, the data split an export was trained
on, label and split checks, output dirs and files (metrics.json, per_class.csv, per_class_accuracy.png)."""
import argparse
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .axes import SPLITS
from .checkpoint import export_record, read_export_config, recorded_inputs, resolve_export_dir
from .config import HF_BUILDER, HF_SOURCE_FLAGS, RECORDED_DATA_FLAGS, recorded_flags
from .errors import UserError, require
from .fileio import atomic_dir, atomic_write_json
from .paths import check_output, check_outputs_apart
from .reports import plot_per_class_accuracy, write_per_class_csv
from .runs import run_export

logger = logging.getLogger("lt")
DEFAULT_OUTPUT_ROOT = Path("eval_outputs")
# the flags an export records (the split, and the local source files it was read from): used unless passed
RECORDED_FLAGS = (*RECORDED_DATA_FLAGS, *HF_SOURCE_FLAGS, "data_dir")


@dataclass
class Target:
    """One row of the evaluation: an export (local dir or Hub id) or a zero-shot CLIP."""

    name: str  # as shown in the table
    slug: str  # file-system safe, unique among the targets
    export_dir: Path = None  # local copy of the export; None for zero-shot
    meta: dict = None
    zero_shot: str = None  # CLIP id/dir
    local: bool = False  # a local export dir (outputs may go beside it), not a Hub cache snapshot
    recorded: dict = field(default_factory=dict)  # data flags recorded with the export
    output_dir: Path = None


# ------------------------------------------------------------------------------------------------ flags
def passed_flags(parser, argv, dests):
    """The dests among `dests` the user actually gave: parse again with their defaults suppressed."""
    actions = [a for a in parser._actions if a.dest in dests]
    saved = [a.default for a in actions]
    for action in actions:  # on the actions, not via set_defaults: argparse would type-convert the sentinel
        action.default = argparse.SUPPRESS
    try:
        given = vars(parser.parse_args(argv))
    finally:
        for action, default in zip(actions, saved):
            action.default = default
    return {a.dest for a in actions} & set(given)


def data_args_for(args, recorded, passed):
    """The data flags of one evaluation: the user's where given, else the export's record, else the defaults."""
    values = vars(args).copy()
    # another --dataset (or --dataset_name) makes the recorded source irrelevant
    other_source = {"dataset", "dataset_name"} & set(passed)
    skip = set(passed) | ({"dataset", "data_dir", *HF_SOURCE_FLAGS} if other_source else set())
    values.update({k: v for k, v in recorded.items() if k not in skip})
    if "dataset_name" in passed:
        values["dataset"] = HF_BUILDER
    return argparse.Namespace(**values)


def recorded_data_flags(meta):
    """Data flags of the split the export was trained on (its config.json's LT split and source files)."""
    data_dir = meta["dataset"].get("data_dir")
    source = {"data_dir": data_dir} if data_dir else {}  # the local files it was trained on, not the default source
    return {**recorded_flags(meta["lt_info"].to_dict()), **source}


# ---------------------------------------------------------------------------------------------- targets
def resolve_run(run, which=None):
    """(local export dir, table name) of a RUN: an export dir, a run dir (its best/, else final/; or `which`) or a
    Hub id."""
    export_dir = run_export(run, which)
    if export_dir is not None and export_dir != Path(run):
        logger.info(f"{run}: a run dir; evaluating its {export_dir.name}/ export")
        return export_dir, str(export_dir)
    export_dir = resolve_export_dir(run)  # UserError for a missing path or an unreachable Hub id
    return export_dir, str(run)


def build_targets(runs, zero_shot=None, prompt_template="single", which=None):
    targets = []
    for run in runs:
        export_dir, name = resolve_run(run, which)
        meta = export_record(read_export_config(export_dir), export_dir)  # UserError for a non-export dir
        slug = _slug("/".join(Path(name).parts[-2:]))  # e.g. run__best
        targets.append(Target(name=name, slug=slug, export_dir=export_dir, meta=meta, local=Path(run).exists(),
                              recorded=recorded_data_flags(meta)))
    if zero_shot:
        name = f"zero-shot {zero_shot} ({prompt_template})"
        model = str(zero_shot).rstrip("/").split("/")[-1]
        targets.append(Target(name=name, slug=_slug(f"zero_shot_{model}_{prompt_template}"), zero_shot=zero_shot))
    seen = {}
    for target in targets:  # the same export twice (or two runs named alike) still get their own folders
        seen[target.slug] = seen.get(target.slug, 0) + 1
        if seen[target.slug] > 1:
            target.slug += f"_{seen[target.slug]}"
    return targets


def _slug(text):
    text = str(text).strip("/").replace("/", "__")
    return re.sub(r"[^\w.-]+", "_", text) or "run"


def eval_dir_name(split, tte):
    return f"eval_{split}" + ("" if tte == "none" else f"_{tte}")


def assign_output_dirs(targets, output_dir, split, tte, overwrite, data_inputs=None):
    """Set each target's output dir: --output_dir (one target) or --output_dir/<slug>; by default beside a local
    export, else eval_outputs/<slug>/ (zero-shot and Hub ids: the Hub cache is never written into).

    Returns the comparison.md path (several targets) or None. Refuses existing, unwritable outputs and an --output_dir
    overlapping any input (an export, the zero-shot model, data files) before anything runs.
    """
    leaf = eval_dir_name(split, tte)
    for target in targets:
        if output_dir is not None:
            target.output_dir = Path(output_dir) / (target.slug if len(targets) > 1 else "")
        elif target.local:
            target.output_dir = Path(target.export_dir) / leaf
        else:
            target.output_dir = DEFAULT_OUTPUT_ROOT / target.slug / leaf
    comparison = None
    if len(targets) > 1:
        comparison = Path(output_dir) / "comparison.md" if output_dir else DEFAULT_OUTPUT_ROOT / f"comparison_{leaf}.md"
    paths = [t.output_dir for t in targets] + ([comparison] if comparison else [])
    require(len(set(paths)) == len(paths), f"two evaluations would write to {paths[0]}; give each run once")
    inputs = {**{f"RUN {t.name}": t.export_dir for t in targets if t.local},
              **{"--zero_shot": t.zero_shot for t in targets if t.zero_shot}, **(data_inputs or {})}
    for t in targets:
        if t.local:
            inputs.update(recorded_inputs(t.export_dir, f"RUN {t.name}"))
    if output_dir is not None:  # the default, <export>/eval_<split>, is a new folder of the export's own evaluations
        check_outputs_apart({"--output_dir": output_dir}, inputs)
    else:  # ... but never one of the folders the export records as its inputs
        check_outputs_apart({"output dir": t.output_dir for t in targets},
                            {k: v for k, v in inputs.items() if not k.startswith("RUN ") or "'s " in k})
    for target in targets:
        check_output(target.output_dir, "--output_dir" if output_dir is not None else "output dir")
    for path in paths:
        require(overwrite or not path.exists(), f"{path} already exists; pass --overwrite to replace it or --output_dir")
    return comparison


# ----------------------------------------------------------------------------------------------- checks
def check_launch(accelerator):
    """torchrun on CPU without ACCELERATE_USE_CPU=1 starts processes that accelerate does not connect: each would
    evaluate everything alone and all would write the same outputs."""
    from accelerate.utils import DistributedType

    world = int(os.environ.get("WORLD_SIZE", "1"))
    connected = accelerator.num_processes == world and (world == 1 or accelerator.distributed_type != DistributedType.NO)
    require(connected, f"{world} processes were started but accelerate did not connect them; on CPU set "
                       "ACCELERATE_USE_CPU=1 for torchrun, on GPUs use accelerate launch")


def check_split(split, ds=None, dataset=None):
    require(split in SPLITS, f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if ds is not None:
        require(len(ds[split]) > 0, f"the {split} split of {dataset} is empty; evaluate another --split")


def check_labels(meta, class_names, source, dataset):
    """The export's id2label must name the dataset's classes, in order."""
    labels = [meta["id2label"].get(str(i)) for i in range(int(meta["num_labels"]))]
    if labels == list(class_names):
        return
    for i, (ours, theirs) in enumerate(zip(labels, class_names)):
        require(ours == theirs, f"{source} was trained on other classes: label {i} is {ours!r} in the export but "
                                f"{theirs!r} in {dataset}; evaluate it on the dataset it was trained on (--dataset)")
    raise UserError(f"{source} has {len(labels)} classes but {dataset} has {len(class_names)}; "
                    "evaluate it on the dataset it was trained on (--dataset)")


def warn_if_other_split(target, info, split):
    """An export evaluated on a split other than the one its config.json records: allowed, but said."""
    if target.meta is None:
        return
    recorded = (target.meta["lt_info"].index_hashes or {}).get(split)
    if recorded and recorded != info.index_hashes.get(split):
        logger.warning(f"{target.name}: the {split} split differs from the one recorded with the export "
                       "(other data flags or source files)")


# ---------------------------------------------------------------------------------------------- outputs
def eval_config(target, args, data_args, info, mixed_precision):
    """What defines the numbers (not where they were computed: the process count does not change them)."""
    config = {"model": target.zero_shot or target.name, "split": args.split, "tte": args.tte,
              "tte_views": args.tte_views if args.tte == "randaug" else None,
              "tte_expand": args.tte_expand, "interpolation": args.interpolation,
              "dataset": {flag: getattr(data_args, flag) for flag in RECORDED_DATA_FLAGS
                          if flag not in ("many_threshold", "few_threshold")},
              "split_hash": info.index_hashes.get(args.split), "many_threshold": info.many_threshold,
              "few_threshold": info.few_threshold, "max_eval_samples": args.max_eval_samples,
              "mixed_precision": mixed_precision}
    if data_args.dataset == HF_BUILDER:  # the `datasets` source the split was built from
        config["dataset"]["hf_source"] = {flag: getattr(data_args, flag) for flag in HF_SOURCE_FLAGS}
    if target.zero_shot:
        config["prompt_template"] = args.prompt_template
        if args.prompt_descriptor_file:
            config["prompt_descriptor_file"] = str(args.prompt_descriptor_file)
    return config


def write_outputs(target, config, metrics, info, overwrite, predictions=None):
    """metrics.json, per_class.csv and per_class_accuracy.png (+ predictions.csv with --save_predictions), appearing
    together in target.output_dir."""
    from .inference import write_eval_predictions

    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    with atomic_dir(target.output_dir, overwrite=overwrite) as tmp:
        atomic_write_json(tmp / "metrics.json", {"config": config, "config_hash": digest, "metrics": metrics})
        write_per_class_csv(tmp / "per_class.csv", metrics, info.class_names, info.train_counts, info.groups)
        plot_per_class_accuracy(tmp / "per_class_accuracy.png", metrics, info.train_counts, info.groups,
                                title=f"{target.name}: {config['split']}")
        if predictions is not None:
            write_eval_predictions(tmp / "predictions.csv", predictions, info.class_names)


def record_on_export(target, split, metrics, info, tte, max_eval_samples):
    """A local export evaluated on the very split it records (same images, groups, whole, no test-time ensembling):
    the numbers become the export's own, added to its metrics.json (numbers recorded already are kept) and shown in
    its model card's model-index, so a push publishes them. Returns whether the export was updated."""
    from .exports import refresh_model_card
    from .fileio import read_json

    meta = target.meta
    same_split = (target.local and meta is not None and tte == "none" and max_eval_samples is None
                  and (meta["lt_info"].index_hashes or {}).get(split) == info.index_hashes.get(split) is not None
                  and (meta["many_threshold"], meta["few_threshold"]) == (info.many_threshold, info.few_threshold))
    if not same_split:
        return False
    path = Path(target.export_dir) / "metrics.json"
    recorded = read_json(path, "metrics") if path.is_file() else {}
    if "accuracy" in (recorded.get(split) or {}):
        return False
    recorded = {**recorded, split: metrics}
    atomic_write_json(path, recorded)
    refresh_model_card(target.export_dir, recorded)
    return True
