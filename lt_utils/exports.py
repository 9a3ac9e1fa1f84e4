"""Writing a run's export dirs (the layout and the reading side live in checkpoint.py)."""
import dataclasses
import json
from pathlib import Path

from .checkpoint import export_record, read_export_config, write_export
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
    """Rewrite an export of the earlier layout (lt_model.json + lt_weights.safetensors + a second full copy in
    model.safetensors) as this layout, into `new_dir` (the old folder is only read). Its model.safetensors already
    held the whole model with LoRA merged: the new export holds those tensors, under the one config.json."""
    import shutil

    from .checkpoint import (CONFIG_FILE, HEAD_INIT_FILE, OLD_LAYOUT_FILE, load_export, read_tensors, weight_files)
    from .errors import require
    from .fileio import read_json
    from .paths import check_output, check_outputs_apart
    from .hub_files import ADAPTER_DIR
    from .modeling_lt import LTConfig

    old_dir, new_dir = Path(old_dir), Path(new_dir)
    require((old_dir / OLD_LAYOUT_FILE).is_file(), f"{old_dir} has no {OLD_LAYOUT_FILE}: it is not an export of the "
                                                  "earlier layout (a current export needs no conversion)")
    check_outputs_apart({"NEW_DIR": new_dir}, {"OLD_DIR": old_dir})
    require(not new_dir.exists(), f"{new_dir} already exists; pass a new folder")
    check_output(new_dir, "NEW_DIR")
    meta = read_json(old_dir / OLD_LAYOUT_FILE, "export metadata")
    hub = read_json(old_dir / CONFIG_FILE, "export config")
    info_path = old_dir / "lt_info.json"
    info = read_json(info_path, "split record") if info_path.is_file() else {
        "dataset": meta["dataset"]["dataset"], "train_counts": meta["train_counts"], "groups": meta["groups"],
        **{k: meta["dataset"][k] for k in ("imb", "max_per_class", "seed", "selection")},
        "many_threshold": meta["many_threshold"], "few_threshold": meta["few_threshold"]}
    require(isinstance(meta, dict) and isinstance(hub, dict) and isinstance(info, dict),
            f"{old_dir}: its records are not mappings; re-export it with this version")
    try:
        config = LTConfig.from_dict({
            **{k: v for k, v in hub.items() if k not in ("auto_map", "transformers_version")},
            "arch": {k: v for k, v in meta["arch"].items() if k != "lora"}, "backbone_spec": meta["backbone"],
            "base_model": meta["base_model"], "from_scratch": meta["from_scratch"], "seed": meta.get("seed", 0),
            "method": meta["method"], "head_init": {k: meta["head"][k] for k in ("init", "init_fingerprint")},
            "lt_info": {k: v for k, v in info.items() if k != "class_names"}, "soup": meta.get("soup"),
            "run": {"balance_factor": meta["dataset"].get("balance_factor"), "data_dir": meta["dataset"].get("data_dir"),
                    "run_name": meta.get("run_name"), "hub_model_id": meta.get("hub_model_id")},
            "lt_format": LTConfig.export_format})
    except (KeyError, TypeError) as err:
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
    metrics = read_json(old_dir / "metrics.json", "metrics") if (old_dir / "metrics.json").is_file() else None
    extra = [lambda d: (Path(d) / "README.md").write_text(model_card(record, metrics or {}))]
    if metrics is not None:
        extra.append(lambda d: (Path(d) / "metrics.json").write_text(json.dumps(metrics, indent=2)))
    if (old_dir / ADAPTER_DIR).is_dir():
        extra.append(lambda d: shutil.copytree(old_dir / ADAPTER_DIR, Path(d) / ADAPTER_DIR))
    write_export(new_dir, config, model.state_dict(), read_tensors(old_dir / HEAD_INIT_FILE), extra_writers=extra)
    return new_dir
