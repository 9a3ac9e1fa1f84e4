"""Writing a run's export dirs (the format and the reading side live in checkpoint.py)."""
import dataclasses
import json
from pathlib import Path

from .checkpoint import write_export
from .errors import UserError
from .heads import fingerprint
from .hub import model_card
from .models import LTModel
from .peft_methods import METHODS, export_state_dict


@dataclasses.dataclass
class Exporter:
    """What every export of a run needs, fixed once the model is built; `save` writes one (best/, final/).

    args: the run's flags (base model, method, head, seed, data subset); arch: the architecture record
    (peft_methods.Method.arch); head_init: the head as initialised; overrides: the tensors an --init_from export set
    on top of the base (kept in every export, so it rebuilds from the base alone).
    """

    args: object
    info: object
    lt_model: object
    arch: dict
    head_init: object
    overrides: dict = None

    @property
    def method(self):
        return METHODS.get(self.args.method)

    def meta(self):
        args, info = self.args, self.info
        return {
            "base_model": args.model_name_or_path, "from_scratch": bool(args.from_scratch), "seed": args.seed,
            "backbone": self.lt_model.spec.to_dict(), "arch": self.arch, "method": args.method,
            "head": {"type": args.head_type, "scale": args.head_scale,
                     "init": "from " + str(args.init_from) if args.init_from else args.head_init,
                     "init_fingerprint": fingerprint(self.head_init)},
            "num_labels": len(info.class_names),
            "id2label": {str(i): n for i, n in enumerate(info.class_names)},
            "label2id": {n: i for i, n in enumerate(info.class_names)},
            "train_counts": list(info.train_counts), "groups": list(info.groups),
            "group_counts": info.group_counts(), "many_threshold": info.many_threshold, "few_threshold": info.few_threshold,
            "dataset": {"dataset": info.dataset, "imb": info.imb, "max_per_class": info.max_per_class,
                        "seed": info.seed, "selection": info.selection, "balance_factor": args.balance_factor,
                        # the local source files (eval_lt.py reads the same ones by default)
                        "data_dir": str(Path(args.data_dir).resolve()) if getattr(args, "data_dir", None) else None},
            "has_weights_file": True, "run_name": Path(args.output_dir).name,
            "hub_model_id": getattr(args, "hub_model_id", None),
        }

    def gather(self, accelerator, train_model):
        """Collective (every rank): the full state dict, gathered under ZeRO-3, reduced to what the export stores."""
        state_dict = accelerator.get_state_dict(train_model)
        if state_dict is None:  # ZeRO-3 gathers the 16-bit weights onto the main process only
            return None, {}
        if self.method.head_only and not isinstance(accelerator.unwrap_model(train_model), LTModel):  # the head alone (cached features)
            full = {k: v for k, v in self.lt_model.state_dict().items()}
            full.update({f"head.{k}": v for k, v in state_dict.items()})
            state_dict = full
        if self.method.peft:
            return state_dict, dict(self.overrides or {})
        if self.args.from_scratch:
            tensors = dict(state_dict)
        else:
            tensors = export_state_dict(state_dict, self.args.method, self.arch)
        for key in self.overrides or {}:
            tensors.setdefault(key, state_dict[key])
        return state_dict, tensors

    def save(self, export_dir, accelerator, train_model, metrics=None):
        """Gather on every rank, write on the main process (atomically)."""
        state_dict, tensors = self.gather(accelerator, train_model)
        if not accelerator.is_main_process:
            return
        meta = self.meta()
        meta["has_weights_file"] = bool(tensors)
        peft_model, peft_sd = None, None
        if self.method.peft:
            from peft import get_peft_model_state_dict

            peft_model = accelerator.unwrap_model(train_model, keep_torch_compile=False)
            check_adapter_complete(get_peft_model_state_dict(peft_model, state_dict=state_dict), peft_model)
            peft_sd = state_dict  # save_pretrained selects the adapter (and head) from the full state dict itself
        info = self.info
        writers = [lambda d: info.save(Path(d) / "lt_info.json"),
                   lambda d: (Path(d) / "README.md").write_text(model_card(meta, metrics or {}))]
        if metrics is not None:
            writers.append(lambda d: (Path(d) / "metrics.json").write_text(json.dumps(metrics, indent=2)))
        write_export(export_dir, meta, tensors, {"weight": self.head_init}, writers, peft_model=peft_model,
                     peft_state_dict=peft_sd)


def check_adapter_complete(peft_sd, peft_model):
    """ZeRO-3 without a 16-bit gather writes empty adapters (hf_stack §14.2): compare numel with the trainable set."""
    saved = sum(v.numel() for v in peft_sd.values())
    trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in peft_model.parameters() if p.requires_grad)
    if saved < trainable:
        raise UserError(f"the adapter to export has {saved} values but {trainable} are trained; under DeepSpeed ZeRO-3 set "
                        "zero3_save_16bit_model: true in the accelerate config")


def refresh_model_card(export_dir, metrics):
    from .checkpoint import META_FILE
    from .fileio import atomic_write_text, read_json

    meta = read_json(Path(export_dir) / META_FILE, "export metadata")
    atomic_write_text(Path(export_dir) / "README.md", model_card(meta, metrics))
