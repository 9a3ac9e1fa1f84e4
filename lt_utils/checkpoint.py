"""Resume states and export dirs, kept apart.

* Resume state: `accelerator.save_state` into OUTPUT_DIR/step_{n}; only trainable weights are written (frozen
  backbones are rebuilt from the base checkpoint), plus optimizer, RNG, dataloader position and `TrainState`.
* Export dir (`final/`, `best/`, a soup): exactly a transformers model, its one record being config.json:
    config.json            the LTConfig: backbone class and config, method modules, head, labels, preprocessing,
                           where the weights started, the LT split (counts, groups), the run, a soup's recipe
    model.safetensors      every tensor of the model, once (LoRA merged in; sharded with an index when large)
    modeling_lt.py (+ the files it imports)   the model's code, for AutoModelForImageClassification with
                           trust_remote_code=True where this project is not installed
    preprocessor_config.json   the evaluation preprocessing (resize, centre crop, mean/std) for AutoImageProcessor
    head_init.safetensors  the head as initialised: the zero-shot anchor of WiSE-FT / progressive soups
    adapter/               LoRA runs: a standard peft adapter of the plain base model (adapter_config.json naming
                           the base, adapter_model.safetensors) and head.safetensors, the head to apply to its feature
    metrics.json, README.md (model card)
  Every loader of the project (eval_lt.py, soup.py, predict.py, --init_from) reads an export with `from_pretrained`
  of that folder (`load_export`); none needs the base checkpoint.
"""
import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .compile import plain_name
from .errors import UserError, first_line
from .fileio import atomic_dir, atomic_write_json, read_json
from .modeling_lt import LTConfig

HEAD_INIT_FILE = "head_init.safetensors"
EXPORT_FORMAT = LTConfig.export_format
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
OLD_LAYOUT_FILE = "lt_model.json"  # the record of exports written by earlier versions
CONVERT_COMMAND = "python scripts/convert_export.py"
V3_FORMAT = "lt-export-v3"  # config.json with the method's name in `method` and its modules' settings in `arch`
V4_FORMAT = "lt-export-v4"  # the validation split recorded as "val" (lt_info's split_sizes / index_hashes, metrics.json)
CONVERTIBLE_FORMATS = (V3_FORMAT, V4_FORMAT)  # earlier config.json layouts the converter rewrites
CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")


# ----------------------------------------------------------------------------------------------- resume states
def checkpoint_dir(output_dir, step):
    return Path(output_dir) / f"step_{step}"


def find_latest_checkpoint(output_dir):
    """The step_{n} folder with the largest n (numeric, not by name or ctime), or None."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    # lt_resume.json is written last: a step_N without it (emptied, copied half) is not a checkpoint
    steps = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name)) and (p / "lt_resume.json").is_file()]
    return max(steps)[1] if steps else None


def resolve_resume_path(resume_from_checkpoint, output_dir):
    if resume_from_checkpoint == "latest":
        path = find_latest_checkpoint(output_dir)
        if path is None:
            raise UserError(f"--resume_from_checkpoint latest: no complete step_* checkpoint in {output_dir}; start "
                            "without --resume_from_checkpoint")
        return path
    path = Path(resume_from_checkpoint)
    if not (path / "lt_resume.json").is_file():
        raise UserError(f"{path} is not a resume checkpoint (no lt_resume.json); pass a step_* folder or 'latest'")
    return path


def register_trainable_only_hooks(accelerator):
    """Write only trainable tensors (and BatchNorm running statistics, which move in train mode) into resume states:
    a LoRA checkpoint would otherwise hold the whole backbone."""
    from .batchnorm import is_running_stat

    def save_hook(models, weights, output_dir):
        for model, weight in zip(models, weights):
            trainable = {plain_name(n) for n, p in model.named_parameters() if p.requires_grad}
            for key in [k for k in weight if k not in trainable and not is_running_stat(k)]:
                del weight[key]

    accelerator.register_save_state_pre_hook(save_hook)


def write_resume_record(path, identity, run_spec, resume_changes=()):
    """What a resume must agree on, written last into a checkpoint: the data identity (classes, training images;
    checked once the data is loaded), the run's spec (spec.RunSpec.record; compared before anything runs) and the
    changes earlier resumes were allowed (--resume_allow_changes)."""
    atomic_write_json(Path(path) / "lt_resume.json", {**identity, "run_spec": run_spec,
                                                      "resume_changes": list(resume_changes)})


def read_resume_record(path):
    try:
        saved = read_json(Path(path) / "lt_resume.json", "resume record")
    except UserError:
        saved = None
    if not isinstance(saved, dict):
        raise UserError(f"{path}/lt_resume.json is corrupted; resume from another step_* folder")
    return saved


def check_resume_identity(path, identity):
    saved = read_resume_record(path)
    for key, value in identity.items():
        if saved.get(key) != value:
            raise UserError(f"cannot resume from {path}: its {key} is {saved.get(key)!r} but this run has {value!r}; "
                            "resume with the same data or start a new --output_dir")


# ------------------------------------------------------------------------------------------------------ exports
def write_export(export_dir, config, state_dict, head_init, extra_writers=(), adapter=None):
    """Atomically write an export dir (main process only; the collective gather happens before it).

    config: the export's LTConfig; state_dict: every tensor of its LTModel (LTModel key names); head_init: the head
    as initialised ({"weight": ...}); adapter: callable f(tmp_dir) writing a LoRA run's plain peft adapter/;
    extra_writers: callables f(tmp_dir) for metrics and model card.
    """
    from .hub_files import image_processor, save_model
    from .models import BackboneSpec

    for part, what in ((state_dict, "weights"), (head_init, "head init")):  # never an export of NaN / inf weights
        check_finite(part, f"refusing to export {export_dir} ({what})", "the run diverged: nothing was exported; lower "
                     "--learning_rate or set --max_grad_norm, and resume from an earlier checkpoint")
    with atomic_dir(export_dir, overwrite=True, nbytes=tensor_bytes(state_dict) + tensor_bytes(head_init)) as tmp:
        save_model(tmp, config, state_dict)
        image_processor(BackboneSpec.from_dict(config.backbone_spec)).save_pretrained(str(tmp))
        save_file(_contiguous(head_init), str(tmp / HEAD_INIT_FILE), metadata={"format": "pt"})
        if adapter is not None:
            adapter(tmp)
        for write in extra_writers:
            write(tmp)


def tensor_bytes(tensors):
    """The bytes `tensors` (a state dict, or parameters) take on disk: free space is checked against it first."""
    return sum(t.numel() * t.element_size() for t in (tensors.values() if isinstance(tensors, dict) else tensors))


def _contiguous(tensors):
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def is_export_dir(path):
    """A folder holding a model record (config.json, or an earlier layout's), whatever its files hold: reading it says
    what is wrong with them, rather than the folder being passed over."""
    path = Path(path)
    return (path / OLD_LAYOUT_FILE).is_file() or (path / CONFIG_FILE).is_file()


def earlier_format(export_dir):
    """The format of an export written by an earlier version that the converter rewrites, else None."""
    export_dir = Path(export_dir)
    if (export_dir / OLD_LAYOUT_FILE).is_file():
        return "lt-export-v2"
    try:
        record = json.loads((export_dir / CONFIG_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    fmt = record.get("lt_format") if isinstance(record, dict) else None
    return fmt if fmt in CONVERTIBLE_FORMATS else None


def is_project_export(path):
    """An export dir whose config.json does not name another model type (those are other transformers models)."""
    if not is_export_dir(path):
        return False
    try:
        record = json.loads((Path(path) / CONFIG_FILE).read_bytes())
    except (OSError, ValueError):
        return True  # unreadable: read_export_config reports it
    return not isinstance(record, dict) or record.get("model_type") in (None, LTConfig.model_type)


def read_export_config(export_dir):
    """The LTConfig of an export dir (local path or Hub id), its records checked; UserError for anything else."""
    export_dir = resolve_export_dir(export_dir)
    path = export_dir / CONFIG_FILE
    if (export_dir / OLD_LAYOUT_FILE).is_file():
        raise UserError(f"{export_dir} is an export of an earlier version (lt_model.json); convert it once with "
                        f"{CONVERT_COMMAND} {export_dir} NEW_DIR and use NEW_DIR")
    if not path.is_file():
        raise UserError(f"{export_dir} is not an export dir (no {CONFIG_FILE}); pass a final/ or best/ folder written "
                        "by train_lt.py or soup.py")
    record = read_json(path, "export config")
    if not isinstance(record, dict) or record.get("model_type") != LTConfig.model_type:
        found = record.get("model_type") if isinstance(record, dict) else type(record).__name__
        raise UserError(f"{path} is a {found!r} model, not an lt-hf export; pass a final/ or best/ folder written by "
                        "train_lt.py or soup.py")
    if record.get("lt_format") in CONVERTIBLE_FORMATS:
        raise UserError(f"{path} has format {record.get('lt_format')}; this version reads {EXPORT_FORMAT}: convert it "
                        f"once with {CONVERT_COMMAND} {export_dir} NEW_DIR and use NEW_DIR")
    if record.get("lt_format") != EXPORT_FORMAT:
        raise UserError(f"{path} has format {record.get('lt_format')!r}; this version reads {EXPORT_FORMAT}; "
                        "re-export it")
    try:
        config = LTConfig.from_dict(record)
    except Exception as err:  # a record edited into something transformers cannot build a config from
        raise UserError(f"{path} is not a valid export config ({err.__class__.__name__}); re-export it") from None
    _check_record(config, path)
    return config


_RECORD_TYPES = {"backbone_spec": dict, "lt_info": dict, "head_init": dict, "method": dict, "run": dict,
                 "backbone_model_config": dict, "id2label": dict}


def _check_record(config, path):
    """The fields the project reads back, present, of their type, and finite where numeric."""
    from .models import BackboneSpec

    for name, kind in _RECORD_TYPES.items():
        if not isinstance(getattr(config, name, None), kind):
            raise UserError(f"{path}: {name} is missing or not a {kind.__name__}; the export is corrupted, re-export it")
    scale = config.head_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0 < float(scale) < float("inf")):
        raise UserError(f"{path}: head_scale is {scale!r}, not a positive finite number; the export is corrupted, "
                        "re-export it")
    counts = config.lt_info.get("train_counts")
    if not config.num_labels or sorted(config.id2label) != list(range(config.num_labels)) or \
            not isinstance(counts, list) or len(counts) != config.num_labels:
        raise UserError(f"{path}: {config.num_labels} labels for {len(counts or [])} per-class train counts; the export "
                        "is corrupted, re-export it")
    BackboneSpec.from_dict(config.backbone_spec)  # unknown or missing keys: one line
    export_record(config, path.parent)  # the split record's counts, groups and ratios: one line


def weight_files(export_dir):
    """The export's safetensors weight files: model.safetensors, or the shards its index names."""
    export_dir = Path(export_dir)
    if (export_dir / WEIGHTS_INDEX).is_file():
        index = read_json(export_dir / WEIGHTS_INDEX, "weight index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{export_dir / WEIGHTS_INDEX} has no weight_map; re-export it")
        names = sorted(set(map(str, weight_map.values())))
        if any("/" in n or n.startswith(".") for n in names):
            raise UserError(f"{export_dir / WEIGHTS_INDEX} names files outside the export; re-export it")
        files = [export_dir / name for name in names]
    else:
        files = [export_dir / WEIGHTS_FILE]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"export dir {export_dir} is incomplete: missing {', '.join(missing)}; re-export it")
    return files


def weight_keys(config):
    """{key in the export's weight files: LTModel key}. transformers saves some backbones under their checkpoints'
    original names (ViT's encoder.layer.N.attention.attention.query, ...) and renames them when loading; readers of
    the files themselves (soups) map them back with this. Found on a meta-device copy of the model."""
    from transformers.modeling_utils import revert_weight_conversion

    from .hub_files import without_zero3
    from .modeling_lt import LTForImageClassification

    with without_zero3(), torch.device("meta"):
        shell = LTForImageClassification(config)
    state = shell.state_dict()
    names = {id(v): k for k, v in state.items()}
    mapping = {k: names.get(id(v)) for k, v in revert_weight_conversion(shell, dict(state)).items()}
    if None in mapping.values() or len(set(mapping.values())) != len(state):
        raise UserError(f"the {config.backbone_class} weights are saved transformed (not renamed), so they cannot be "
                        "merged file by file; load the exports with load_export instead")
    return {k: v.removeprefix(f"{LTForImageClassification.base_model_prefix}.") for k, v in mapping.items()}


def resolve_export_dir(path_or_repo):
    path = Path(path_or_repo).expanduser()
    if path.exists():
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path_or_repo)):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(str(path_or_repo)))
        except Exception as err:  # offline, missing repo, auth: all user-fixable
            raise UserError(f"could not fetch {path_or_repo} from the Hub ({err.__class__.__name__}); "
                            "check the id and your connection, or pass a local export dir") from None
    raise UserError(f"export dir {path_or_repo} not found; pass a local final/ or best/ folder or a Hub model id")


def load_export(export_dir):
    """(LTModel in eval mode, record) of an export dir or Hub id, through `from_pretrained` of that folder alone.

    Refused in one line: another layout, a record that is not this project's, weight files that are missing,
    truncated, of other keys or shapes, or hold NaN / inf."""
    from .modeling_lt import LTForImageClassification
    from .models import BackboneSpec, _quiet_transformers

    export_dir = resolve_export_dir(export_dir)
    config = read_export_config(export_dir)
    for path in weight_files(export_dir):
        read_tensors(path)  # complete and finite, before transformers sees it (its errors are not one line)
    head_init = read_tensors(export_dir / HEAD_INIT_FILE)
    try:
        with _quiet_transformers():
            hf_model, info = LTForImageClassification.from_pretrained(
                str(export_dir), config=config, dtype=torch.float32, output_loading_info=True,
                ignore_mismatched_sizes=True)  # reported as mismatched_keys below: the refusal names the tensor
    except Exception as err:  # weights that do not fit the recorded architecture, or a record that builds nothing
        raise UserError(f"{export_dir}: the model cannot be built from its config.json and weights "
                        f"({err.__class__.__name__}: {first_line(err)}); re-export it") from None
    wrong = sorted(info.get("missing_keys") or []) + sorted(info.get("unexpected_keys") or []) + \
        sorted(str(k) for k in info.get("mismatched_keys") or [])
    if wrong:
        raise UserError(f"{export_dir}: its weights do not match its config.json ({len(wrong)} tensors, e.g. "
                        f"{wrong[0]}); re-export it")
    model = hf_model.lt
    model.spec = BackboneSpec.from_dict(config.backbone_spec)
    if head_init.get("weight") is None or tuple(head_init["weight"].shape) != tuple(model.head.weight.shape):
        raise UserError(f"{export_dir / HEAD_INIT_FILE} does not fit the head {tuple(model.head.weight.shape)}; "
                        "re-export it")
    model.eval()
    return model, export_record(config, export_dir)


def recorded_inputs(export_dir, label):
    """{label: path} of the local folders an export names as its inputs (the --data_dir it was trained on, its saved
    LT split, its base model): outputs stay apart from them as from typed inputs. {} for a Hub id, a folder that is
    not a readable export (its own check reports that) or no export."""
    if export_dir is None or not Path(str(export_dir)).exists():
        return {}
    try:
        config = read_export_config(export_dir)
    except UserError:
        return {}
    named = {"data_dir": config.run.get("data_dir"), "saved split": config.lt_info.get("dataset"),
             "base model": config.base_model}
    return {f"{label}'s {what}": path for what, path in named.items()
            if isinstance(path, str) and os.path.isabs(path)}


def export_record(config, export_dir=None):
    """The export's record as one dict, derived from its LTConfig (nothing here is stored a second time)."""
    from .data.counts import GROUPS
    from .data.info import LTInfo

    labels = [config.id2label[i] for i in range(config.num_labels)]
    info = LTInfo.from_dict({**config.lt_info, "class_names": labels},
                            origin=f"the lt_info of {export_dir or 'the export'}/{CONFIG_FILE}")
    groups = list(info.groups)
    run = dict(config.run)
    return {
        "format": config.lt_format, "base_model": config.base_model, "from_scratch": bool(config.from_scratch),
        "seed": config.seed, "backbone": dict(config.backbone_spec), "method": config.method.get("name"),
        "method_config": dict(config.method),
        "head": {"type": config.head_type, "scale": config.head_scale, **config.head_init},
        "num_labels": config.num_labels, "id2label": {str(i): n for i, n in enumerate(labels)},
        "label2id": {n: i for i, n in enumerate(labels)}, "lt_info": info,
        "train_counts": list(info.train_counts), "groups": groups,
        "group_counts": {g: groups.count(g) for g in GROUPS},
        "many_threshold": info.many_threshold, "few_threshold": info.few_threshold,
        "dataset": {"dataset": info.dataset, "imb": info.imb, "max_per_class": info.max_per_class, "seed": info.seed,
                    "selection": info.selection, "balance_factor": run.get("balance_factor"),
                    "data_dir": run.get("data_dir")},
        "run_name": run.get("run_name"), "hub_model_id": run.get("hub_model_id"), "soup": config.soup,
        "adapter": export_dir is not None and (Path(export_dir) / "adapter").is_dir(),
    }


def read_tensors(path):
    """A safetensors file's tensors, refused in one line when truncated, garbage or holding NaN / inf."""
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise UserError(f"{path} not found; re-export it") from None
    except Exception as err:  # SafetensorError, a header cut short, bytes that are no safetensors at all
        raise UserError(f"{path} is not a readable safetensors file ({err.__class__.__name__}: "
                        f"{str(err).splitlines()[0][:80] if str(err) else ''}); it is truncated or corrupted, "
                        "re-export it") from None
    check_finite(tensors, str(path), "the file is corrupted or the run diverged; re-export it or use another export")
    return tensors


def check_finite(tensors, source, fix):
    """Refuse NaN / inf in floating tensors: they would give NaN predictions, soups and exports that look valid."""
    for key, value in tensors.items():
        value = value.detach() if hasattr(value, "detach") else value
        if value.is_floating_point() and value.numel() and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise UserError(f"{source}: {key} holds {bad} non-finite values (NaN/inf); {fix}")
