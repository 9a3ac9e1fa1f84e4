"""Writing a run's export dirs (the layout and the reading side live in checkpoint.py)."""
import dataclasses
import json
from pathlib import Path

from .checkpoint import CONVERTIBLE_FORMATS, V3_FORMAT, export_record, read_export_config, write_export
from .errors import UserError
from .hub import model_card
from .hub_files import plain_adapter_writer
from .models import LTModel
from .peft_methods import METHODS, merge_lora_state_dict


@dataclasses.dataclass
class Exporter:
    """What every export of a run needs, fixed once the model is built; `save` writes one (best/, final/).

    config: the exports' LTConfig (built once: architecture, labels, LT split, where the weights started);
    lt_model: the LTModel being trained; head_init: the head as initialised (the soups' zero-shot anchor);
    method: the --method name.
    """

    config: object
    lt_model: object
    head_init: object
    method: str
    lora_config: object = None  # the peft LoraConfig of a LoRA run (its plain adapter is exported beside the model)

    @property
    def entry(self):
        return METHODS.get(self.method)

    def gather(self, accelerator, train_model):
        """Collective (every rank): the whole model's state dict in LTModel key names (gathered under ZeRO-3; None
        on the other ranks then), LoRA factors kept apart: (state dict, LoRA factors or None)."""
        state_dict = accelerator.get_state_dict(train_model)
        if state_dict is None:  # ZeRO-3 gathers the 16-bit weights onto the main process only
            return None, None
        if self.entry.head_only and not isinstance(accelerator.unwrap_model(train_model), LTModel):
            full = dict(self.lt_model.state_dict())  # the head alone trained (cached features)
            full.update({f"head.{k}": v for k, v in state_dict.items()})
            return full, None
        if self.lora_config is not None:
            merged, lora = merge_lora_state_dict(state_dict, self.lora_config)
            check_adapter_complete(lora, accelerator.unwrap_model(train_model, keep_torch_compile=False))
            return merged, lora
        return dict(state_dict), None

    def save(self, export_dir, accelerator, train_model, metrics=None):
        """Gather on every rank, write on the main process (atomically)."""
        state_dict, lora = self.gather(accelerator, train_model)
        if accelerator.is_main_process:
            self.write(export_dir, state_dict, lora, metrics)

    def write(self, export_dir, state_dict, lora=None, metrics=None):
        """The export of `state_dict` (the whole LTModel, LoRA merged) and, for a LoRA run, its factors `lora`."""
        adapter = None
        if lora is not None:
            head = {k.removeprefix("head."): v for k, v in state_dict.items() if k.startswith("head.")}
            adapter = plain_adapter_writer(lora, self.lora_config, self.config.base_model, head,
                                           self.config.head_type, self.config.head_scale)
        record = {**export_record(self.config), "adapter": adapter is not None}
        writers = [lambda d: (Path(d) / "README.md").write_text(model_card(record, metrics or {}))]
        if metrics is not None:
            writers.append(lambda d: (Path(d) / "metrics.json").write_text(json.dumps(metrics, indent=2)))
        write_export(export_dir, self.config, state_dict, {"weight": self.head_init}, writers, adapter=adapter)


def check_adapter_complete(lora, peft_model):
    """ZeRO-3 without a 16-bit gather writes empty adapters: compare the LoRA factors with the trained LoRA set."""
    saved = sum(v.numel() for v in lora.values())
    trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for n, p in peft_model.named_parameters()
                    if p.requires_grad and ".lora_" in n)
    if saved < trainable:
        raise UserError(f"the adapter to export has {saved} values but {trainable} are trained; under DeepSpeed ZeRO-3 set "
                        "zero3_save_16bit_model: true in the accelerate config")


def refresh_model_card(export_dir, metrics):
    from .fileio import atomic_write_text

    record = export_record(read_export_config(export_dir), export_dir)
    atomic_write_text(Path(export_dir) / "README.md", model_card(record, metrics))


def convert_old_export(old_dir, new_dir):
    """Rewrite an export of an earlier layout as this layout, into `new_dir` (the old folder is only read):
    lt-export-v2 (lt_model.json + lt_weights.safetensors + a second full copy in model.safetensors; that copy held the
    whole model with LoRA merged), lt-export-v3 (one config.json, the method's settings in `arch`) or lt-export-v4 (the
    validation split recorded as "val"). The new export holds the same tensors under a config.json whose `method` is
    the method's config (`method_record_of_v3`) and whose records, metrics.json's too, name the split "validation"."""
    import shutil

    from .checkpoint import CONFIG_FILE, HEAD_INIT_FILE, OLD_LAYOUT_FILE, load_export, read_tensors, weight_files
    from .data.info import current_split_names
    from .errors import require
    from .fileio import read_json
    from .paths import check_output, check_outputs_apart
    from .hub_files import ADAPTER_DIR

    old_dir, new_dir = Path(old_dir), Path(new_dir)
    old = _old_record(old_dir / CONFIG_FILE)
    require((old_dir / OLD_LAYOUT_FILE).is_file() or old is not None,
            f"{old_dir} has no {OLD_LAYOUT_FILE} and is no {' / '.join(CONVERTIBLE_FORMATS)} export: it is not an export "
            "of an earlier layout (a current export needs no conversion)")
    check_outputs_apart({"NEW_DIR": new_dir}, {"OLD_DIR": old_dir})
    require(not new_dir.exists(), f"{new_dir} already exists; pass a new folder")
    check_output(new_dir, "NEW_DIR")
    if old is None:
        old = _v3_of_v2(old_dir)
    adapter = read_json(old_dir / ADAPTER_DIR / "adapter_config.json", "adapter config") \
        if (old_dir / ADAPTER_DIR / "adapter_config.json").is_file() else None
    try:
        config = _current_config(old, adapter)
    except (KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{old_dir}: its records lack {err}; re-export it with this version") from None
    for path in weight_files(old_dir):
        read_tensors(path)
    staging = new_dir.with_name(f".{new_dir.name}.staging")  # a loadable folder: the old weights under the new record
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        for path in [*weight_files(old_dir), old_dir / HEAD_INIT_FILE, old_dir / "preprocessor_config.json"]:
            shutil.copyfile(path, staging / path.name)
        config.save_pretrained(str(staging))
        model, record = load_export(staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    metrics = current_split_names(read_json(old_dir / "metrics.json", "metrics")) \
        if (old_dir / "metrics.json").is_file() else None
    extra = [lambda d: (Path(d) / "README.md").write_text(model_card(record, metrics or {}))]
    if metrics is not None:
        extra.append(lambda d: (Path(d) / "metrics.json").write_text(json.dumps(metrics, indent=2)))
    if (old_dir / ADAPTER_DIR).is_dir():
        extra.append(lambda d: shutil.copytree(old_dir / ADAPTER_DIR, Path(d) / ADAPTER_DIR))
    write_export(new_dir, config, model.state_dict(), read_tensors(old_dir / HEAD_INIT_FILE), extra_writers=extra)
    return new_dir


def _old_record(path):
    """config.json of an export of a convertible earlier format (CONVERTIBLE_FORMATS) as a dict, else None."""
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("lt_format") in CONVERTIBLE_FORMATS else None


def _v3_of_v2(old_dir):
    """The lt-export-v3 config.json of an lt-export-v2 export's records."""
    from .checkpoint import CONFIG_FILE, OLD_LAYOUT_FILE
    from .errors import require
    from .fileio import read_json

    meta = read_json(old_dir / OLD_LAYOUT_FILE, "export metadata")
    hub = read_json(old_dir / CONFIG_FILE, "export config")
    info_path = old_dir / "lt_info.json"
    try:
        info = read_json(info_path, "split record") if info_path.is_file() else {
            "dataset": meta["dataset"]["dataset"], "train_counts": meta["train_counts"], "groups": meta["groups"],
            **{k: meta["dataset"][k] for k in ("imb", "max_per_class", "seed", "selection")},
            "many_threshold": meta["many_threshold"], "few_threshold": meta["few_threshold"]}
        require(isinstance(meta, dict) and isinstance(hub, dict) and isinstance(info, dict),
                f"{old_dir}: its records are not mappings; re-export it with this version")
        return {
            **{k: v for k, v in hub.items() if k not in ("auto_map", "transformers_version")},
            "arch": {k: v for k, v in meta["arch"].items() if k != "lora"}, "backbone_spec": meta["backbone"],
            "base_model": meta["base_model"], "from_scratch": meta["from_scratch"], "seed": meta.get("seed", 0),
            "method": meta["method"], "head_init": {k: meta["head"][k] for k in ("init", "init_fingerprint")},
            "lt_info": {k: v for k, v in info.items() if k != "class_names"}, "soup": meta.get("soup"),
            "run": {"balance_factor": meta["dataset"].get("balance_factor"), "data_dir": meta["dataset"].get("data_dir"),
                    "run_name": meta.get("run_name"), "hub_model_id": meta.get("hub_model_id")},
            "lt_format": V3_FORMAT}
    except (KeyError, TypeError) as err:
        raise UserError(f"{old_dir}: its records lack {err}; re-export it with this version") from None


def _current_config(record, adapter_config=None):
    """The LTConfig of an earlier format's config.json record: v3's module settings moved from `arch` into the
    method's config; the split record's per-split values under this version's split names."""
    from .data.info import with_current_split_names
    from .modeling_lt import LTConfig

    method = record["method"]
    if record["lt_format"] == V3_FORMAT:
        method = method_record_of_v3(method, record.get("arch") or {}, adapter_config)
    kept = {k: v for k, v in record.items() if k not in ("arch", "method", "auto_map", "transformers_version")}
    return LTConfig.from_dict({**kept, "method": method, "lt_info": with_current_split_names(record["lt_info"]),
                               "lt_format": LTConfig.export_format})


# v3 `arch` keys -> the method config's fields (lt_utils.methods)
_V3_FIELDS = {"adapter_dim": "r", "partial_layers": "partial_layers", "vpt_len": "vpt_len", "mask_ratio": "mask_ratio",
              "mask_seed": "mask_seed"}


def method_record_of_v3(method, arch, adapter_config=None):
    """The method config record of a v3 export's `method` name and `arch`: the modules' settings belong to the method
    that added them (`arch["adapters"]`), the "base" of a method trained on top of it (--init_from, soups). v3 did not
    record LoRA's settings beyond its adapter/adapter_config.json (r, alpha, dropout); --lora_init is unknown (None)."""
    settings = {new: arch[old] for old, new in _V3_FIELDS.items() if arch.get(old) is not None}
    modules = arch.get("adapters")
    if modules and modules != method:
        return {"name": method, "base": {"name": modules, **settings}}
    if adapter_config is not None:
        settings.update({"r": adapter_config["r"], "lora_alpha": adapter_config["lora_alpha"],
                         "lora_dropout": adapter_config["lora_dropout"], "lora_init": None})
    return {"name": method, **settings}
