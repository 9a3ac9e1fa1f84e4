"""Resume states and export dirs, kept apart (hf_stack.md §1.2).

* Resume state: `accelerator.save_state` into OUTPUT_DIR/step_{n}; only trainable weights are written (frozen
  backbones are rebuilt from the base checkpoint), plus optimizer, RNG, dataloader position and `TrainState`.
* Export dir (`final/`, `best/`, a soup): a Hub-native transformers model plus what rebuilds it from its base:
    config.json, model.safetensors, modeling_lt.py (+ the files it imports)   the whole model (LoRA merged) as
                           transformers remote code: AutoModelForImageClassification(..., trust_remote_code=True)
    preprocessor_config.json   the evaluation preprocessing (resize 8/7, centre crop, mean/std) for AutoImageProcessor
    adapter/               LoRA runs: a standard peft adapter of the plain base backbone (adapter_config.json,
                           adapter_model.safetensors) and head.safetensors, the head to apply to its feature
    lt_model.json          base model, backbone spec, architecture (adapters / LoRA), head, labels, train counts, groups
    lt_weights.safetensors tensors that differ from the base, in LTModel key names (all of them for a from-scratch run)
    lt_adapter/            the peft LoRA adapter of the training wrapper, head included (LoRA runs only)
    head_init.safetensors  the head as initialised: the zero-shot anchor of WiSE-FT / progressive soups
    lt_info.json, metrics.json, README.md (model card)
  `soup.py` and `eval_lt.py` read export dirs only.
"""
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .compile import plain_name
from .errors import UserError
from .fileio import atomic_dir, atomic_write_json, read_json

META_FILE = "lt_model.json"
WEIGHTS_FILE = "lt_weights.safetensors"
HEAD_INIT_FILE = "head_init.safetensors"
LT_ADAPTER_DIR = "lt_adapter"
ADAPTER_CONFIG = f"{LT_ADAPTER_DIR}/adapter_config.json"
ADAPTER_WEIGHTS = f"{LT_ADAPTER_DIR}/adapter_model.safetensors"
EXPORT_FORMAT = "lt-export-v2"
CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
META_KEYS = ("base_model", "from_scratch", "backbone", "arch", "head", "num_labels", "id2label")


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
def write_export(export_dir, meta, tensors, head_init, extra_writers=(), peft_model=None, peft_state_dict=None,
                 hub_files=True):
    """Atomically write an export dir. Main process only; the collective gather happens before it
    (`lt_utils.exports.gather_export_tensors`).

    tensors: LTModel-namespace tensors that differ from the base; head_init: {"weight": ...[, "bias": ...]};
    peft_model: a PeftModel whose adapter (with its `peft_state_dict`) is saved beside them (LoRA runs);
    extra_writers: callables f(tmp_dir) for lt_info, metrics and model card.
    The Hub-native files (hub_files.write_hub_files) are written from the export itself, rebuilt by build_from_meta;
    `hub_files=False` only for tensors that are not a model (tests of soup arithmetic on synthetic tensors).
    """
    from .hub_files import write_hub_files

    for part in (tensors, head_init, peft_state_dict or {}):  # never an export of NaN / inf weights
        check_finite(part, f"refusing to export {export_dir}", "the run diverged: nothing was exported; lower "
                     "--learning_rate or set --max_grad_norm, and resume from an earlier checkpoint")
    with atomic_dir(export_dir, overwrite=True) as tmp:
        if tensors:
            save_file(_contiguous(tensors), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        save_file(_contiguous(head_init), str(tmp / HEAD_INIT_FILE), metadata={"format": "pt"})
        if peft_model is not None:
            peft_model.save_pretrained(str(tmp / LT_ADAPTER_DIR), state_dict=peft_state_dict)
        atomic_write_json(tmp / META_FILE, {"format": EXPORT_FORMAT, **meta})
        if hub_files:
            write_hub_files(tmp, meta)
        for write in extra_writers:
            write(tmp)


def _contiguous(tensors):
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def read_export_meta(export_dir):
    """lt_model.json of an export dir (local path or Hub id), validated; missing/partial dirs are user errors."""
    export_dir = resolve_export_dir(export_dir)
    meta_path = export_dir / META_FILE
    if not meta_path.is_file():
        raise UserError(f"{export_dir} is not an export dir (no {META_FILE}); pass a final/ or best/ folder written by train_lt.py or soup.py")
    meta = read_json(meta_path, "export metadata")
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise UserError(f"{meta_path} has format {found!r}; this version reads {EXPORT_FORMAT}; re-export it")
    lacking = [key for key in META_KEYS if key not in meta]
    if lacking:
        raise UserError(f"{meta_path} lacks {', '.join(lacking)}; the export is corrupted, re-export it")
    needed = [HEAD_INIT_FILE] + ([ADAPTER_CONFIG, ADAPTER_WEIGHTS] if meta["arch"].get("lora") else [])
    if meta.get("has_weights_file"):
        needed.append(WEIGHTS_FILE)
    missing = [name for name in needed if not (export_dir / name).is_file()]
    if missing:
        raise UserError(f"export dir {export_dir} is incomplete: missing {', '.join(missing)}; re-export it")
    return meta


def resolve_export_dir(path_or_repo):
    path = Path(path_or_repo)
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


def build_from_meta(meta, export_dir=None, merge_lora=False):
    """THE rebuild of a model from export metadata (training, resume, --init_from, eval_lt.py and soup.py use it).

    meta needs base_model, num_labels, head {type, scale}, from_scratch, seed and arch. Without `export_dir`: the
    base model with the architecture's modules at their seeded init; with it: the export's tensors (and peft
    adapter; folded into plain weights with `merge_lora`) loaded on top.
    """
    from .models import build_lt_model
    from .peft_methods import METHODS

    model = build_lt_model(meta["base_model"], meta["num_labels"], head_type=meta["head"]["type"],
                           head_scale=meta["head"]["scale"], from_scratch=meta["from_scratch"], seed=meta.get("seed", 0))
    arch = meta.get("arch") or {}
    if arch.get("adapters"):
        model = METHODS.get(arch["adapters"]).rebuild(model, arch)
    if export_dir is None:
        return model
    if meta.get("has_weights_file"):
        load_overrides(model, read_tensors(Path(export_dir) / WEIGHTS_FILE), export_dir, complete=meta["from_scratch"])
    read_tensors(Path(export_dir) / HEAD_INIT_FILE)  # checked: soups and WiSE-FT anchor on it
    if arch.get("lora"):
        read_tensors(Path(export_dir) / ADAPTER_WEIGHTS)  # readable and finite before peft loads it
        try:
            model = METHODS.get("lora").load_adapter(model, Path(export_dir) / LT_ADAPTER_DIR, merge=merge_lora)
        except Exception as err:  # a malformed adapter_config.json or adapter
            raise UserError(f"{export_dir}: the LoRA adapter cannot be loaded ({err.__class__.__name__}); re-export "
                            "it") from None
    return model


def load_export(export_dir, merge_lora=False):
    """(model in eval mode, meta) of an export dir or Hub id. With `merge_lora`, LoRA is folded into plain weights."""
    export_dir = resolve_export_dir(export_dir)
    meta = read_export_meta(export_dir)
    model = build_from_meta(meta, export_dir, merge_lora=merge_lora)
    model.eval()
    return model, meta


def load_overrides(model, tensors, source, complete=False):
    """Load export tensors into `model`, refusing unknown keys or shapes (and, if `complete`, missing keys)."""
    own = model.state_dict()
    unknown = sorted(k for k in tensors if k not in own)
    if unknown:
        raise UserError(f"{source}: {len(unknown)} tensors do not belong to this model (e.g. {unknown[0]}); "
                        "the export and its base model do not match")
    bad_shape = [k for k, v in tensors.items() if v.shape != own[k].shape]
    if bad_shape:
        raise UserError(f"{source}: shape of {bad_shape[0]} is {tuple(tensors[bad_shape[0]].shape)}, "
                        f"the model has {tuple(own[bad_shape[0]].shape)}; the export and its base model do not match")
    if complete:
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise UserError(f"{source}: the from-scratch export lacks {len(missing)} tensors (e.g. {missing[0]}); re-export it")
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)


def export_overrides(model, meta, export_dir):
    """The LTModel-namespace tensors an export holds on top of its base (LoRA merged in, head included), taken from
    `model`, that export loaded with merge_lora=True."""
    sd = model.state_dict()
    keys = set(read_tensors(export_dir / WEIGHTS_FILE)) if meta.get("has_weights_file") else set()
    if meta["arch"].get("lora"):
        keys |= {_lora_target_key(k) for k in read_tensors(export_dir / ADAPTER_WEIGHTS)}
    keys |= {k for k in sd if k.startswith("head.") or k.startswith("adapters.")}
    return {k: sd[k].clone() for k in keys if k in sd}


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


def _lora_target_key(adapter_key):
    """peft's saved key of a LoRA factor or saved module -> the LTModel weight it changes."""
    key = adapter_key.removeprefix("base_model.model.")
    return re.sub(r"\.lora_[AB](\.default)?\.weight$", ".weight", key)
