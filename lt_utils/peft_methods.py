"""Fine-tuning methods (`--method`): one METHODS entry each owns what trains, the modules it adds, what its export
stores and how an export of it is rebuilt (checkpoint.build_from_meta), plus the AdaptFormer and LoRA modules.

A new method is one subclass of `Method` registered in METHODS (see README, "Extending").
"""
import re

import torch
from torch import nn

from .batchnorm import is_running_stat
from .errors import UserError
from . import peft_modules
from .peft_modules import AdaptFormer
from .models import BACKBONES, LTModel, unwrap_lt_model
from .registry import Registry

__all__ = [
    "METHODS", "AdaptFormer", "Method", "apply_method", "bottleneck_dim", "empty_arch", "encoder_layers",
    "export_state_dict", "trainable_parameter_count", "unwrap_lt_model",
]


def bottleneck_dim(num_classes, num_layers):
    """LIFT's rule 2**max(0, floor(log2(K / (2L)))), in exact integer arithmetic."""
    dim = 1
    while dim * 2 * 2 * num_layers <= num_classes:
        dim *= 2
    return dim


def encoder_layers(backbone, kind=None):
    """[(layer, second LayerNorm, MLP branch)] for each transformer block, in order (wiring: BACKBONES[kind])."""
    kinds = [kind] if kind else BACKBONES.names()
    return peft_modules.encoder_layers(backbone, [w for k in kinds for w in BACKBONES.get(k).layer_wiring])


def _attach_adaptformer(lt, r):
    layers = encoder_layers(lt.backbone, lt.spec.kind)
    if len(layers) != lt.spec.num_layers:
        raise RuntimeError(f"found {len(layers)} encoder layers, config says {lt.spec.num_layers}")
    peft_modules.MODULES["adaptformer"](lt, {"adapter_dim": r}, BACKBONES.get(lt.spec.kind).layer_wiring)


def default_lora_targets(backbone, kind):
    """q and v projections (LIFT parity): the first of BACKBONES[kind].lora_targets present in the backbone."""
    names = _linear_leaf_names(backbone)
    candidates = BACKBONES.get(kind).lora_targets
    return list(next((c for c in candidates if set(c) <= names), candidates[-1]))


def _linear_leaf_names(backbone):
    return {name.rsplit(".", 1)[-1] for name, m in backbone.named_modules() if isinstance(m, nn.Linear)}


def _wrap_lora(lt, r, lora_alpha, lora_dropout, target_modules):
    from peft import LoraConfig, get_peft_model

    if isinstance(target_modules, str):
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    targets = list(target_modules or default_lora_targets(lt.backbone, lt.spec.kind))
    unknown = sorted(set(targets) - _linear_leaf_names(lt.backbone))
    if unknown:
        choices = sorted(_linear_leaf_names(lt.backbone))
        raise UserError(f"LoRA targets {unknown} are not Linear layers of the backbone; choose from {choices}")
    # A regex matches full module names, so the head (and a CLIP text tower, were one loaded) never gets LoRA.
    pattern = r"backbone\..*\.(" + "|".join(re.escape(t) for t in targets) + r")"
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=pattern,
        bias="none",
        modules_to_save=["head"],
    )
    return get_peft_model(lt, config)


def empty_arch():
    """The architecture record of a plain LTModel (backbone + head): no adapters, no LoRA."""
    return {"adapters": None, "adapter_dim": None, "lora": None}


class Method:
    """Everything one `--method` decides. Subclass, override what differs, register an instance in METHODS.

    Exports record `arch` (modules beyond backbone + head): `arch["adapters"]` names the method whose modules live
    in the LTModel (rebuilt by its `rebuild`), `arch["lora"]` a peft adapter. checkpoint.build_from_meta uses them.
    """

    trains = ""  # what trains, for --help and the README
    soupable = True  # exports can be averaged tensor by tensor (LoRA: as exact deltas merged into the weights)
    init_from = False  # --init_from accepts it: it trains on top of an export's (LoRA-merged) weights
    head_only = False  # nothing before the head trains: train_lt.py trains the head alone on cached features
    peft = False  # exported with peft's save_pretrained (adapter_model.safetensors) instead of model.safetensors

    def method_args(self, args, num_classes, num_layers):
        """The flags that shape this method's modules, as `apply` takes them."""
        return {}

    def arch(self, margs):
        """The entries of the export's architecture record this method sets (see the class docstring)."""
        return {}

    def rebuild(self, model, arch):
        """Re-create this method's modules on a fresh LTModel from an export's `arch` (its weights load afterwards)."""
        return model

    def apply(self, model, **margs):
        """Mark what trains (all starts frozen but the head) and add modules; returns the model to train."""
        return model

    def exports(self, key):
        """Whether an export stores this LTModel state-dict key; the head always trains, so it always is."""
        return key.startswith("head.")


METHODS = Registry("method", flag="--method")


def _rank(model, r):
    r = bottleneck_dim(model.num_classes, model.spec.num_layers) if r is None else int(r)
    if r < 1:
        raise UserError(f"adapter/LoRA rank r must be >= 1, got {r}")
    return r


def _lift_rank(args, num_classes, num_layers):
    return args.adapter_dim or bottleneck_dim(num_classes, num_layers)


class AdaptFormerMethod(Method):
    trains = "AdaptFormer bottlenecks beside each MLP (r from LIFT's rule, or --adapter_dim)"

    def method_args(self, args, num_classes, num_layers):
        return {"r": _lift_rank(args, num_classes, num_layers)}

    def arch(self, margs):
        return {"adapters": "adaptformer", "adapter_dim": margs["r"]}

    def rebuild(self, model, arch):
        return apply_method(model, "adaptformer", r=arch["adapter_dim"])

    def apply(self, model, r=None, **_):
        r = _rank(model, r)
        if model.adapters is not None:  # rebuilt from an AdaptFormer export: train those adapters further
            existing = model.adapters[0].down.out_features
            if existing != r:
                raise UserError(f"the model already has AdaptFormer adapters of r={existing}, not {r}")
            model.adapters.requires_grad_(True)
        else:
            _attach_adaptformer(model, r)
        return model

    def exports(self, key):
        return key.startswith(("head.", "adapters."))


class LoraMethod(Method):
    trains = "peft LoRA on q_proj,v_proj (--lora_target_modules), r from LIFT's rule, alpha 1"
    peft = True

    def method_args(self, args, num_classes, num_layers):
        return {"r": _lift_rank(args, num_classes, num_layers), "lora_alpha": args.lora_alpha,
                "lora_dropout": args.lora_dropout, "lora_target_modules": args.lora_target_modules}

    def arch(self, margs):
        return {"lora": {k: margs[k] for k in ("r", "lora_alpha", "lora_dropout", "lora_target_modules")}}

    def apply(self, model, r=None, lora_alpha=1.0, lora_dropout=0.0, lora_target_modules=None, **_):
        return _wrap_lora(model, _rank(model, r), lora_alpha, lora_dropout, lora_target_modules)

    @staticmethod
    def load_adapter(model, export_dir, merge=False):
        """The export's peft adapter on `model`; `merge` folds it into plain weights (an LTModel)."""
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(export_dir))
        return model.merge_and_unload() if merge else model


class FullMethod(Method):
    trains = "every weight (backbone, adapters of an --init_from export, head)"
    init_from = True

    def apply(self, model, **_):
        model.backbone.requires_grad_(True)
        if model.adapters is not None:
            model.adapters.requires_grad_(True)
        return model

    def exports(self, key):
        return True


class BitFitMethod(Method):
    trains = "the backbone's biases"
    init_from = True

    def apply(self, model, **_):
        for name, param in model.backbone.named_parameters():
            param.requires_grad_(_is_bias(name))
        return model

    def exports(self, key):
        return key.startswith("head.") or (key.startswith("backbone.") and _is_bias(key))


class HeadMethod(Method):
    trains = "the head only, on cached features (LOS / LT-Soups stage 2)"
    init_from = True
    head_only = True


METHODS.register("adaptformer", AdaptFormerMethod())
METHODS.register("lora", LoraMethod())
METHODS.register("full", FullMethod())
METHODS.register("bitfit", BitFitMethod())
METHODS.register("head", HeadMethod())


def apply_method(model, method, seed=0, **margs):
    """Set what trains (the head always does) and add the method's modules (AdaptFormer, peft LoRA).

    margs: the method's arguments (r, lora_alpha, ...; r None -> bottleneck_dim(K, L)). New modules are
    initialised from `seed`, so repeated builds match. A model that already has adapters (rebuilt from an
    AdaptFormer export) keeps them: they train under "adaptformer" and "full", and stay frozen otherwise.
    """
    entry = METHODS.get(method)
    if not isinstance(model, LTModel):
        raise TypeError(f"apply_method takes an LTModel from build_lt_model, not {type(model).__name__}")
    supported = BACKBONES.get(model.spec.kind).methods
    if supported is not None and method not in supported:
        raise UserError(f"--method {method} does not apply to {model.spec.kind} backbones; choose one of "
                        f"{', '.join(supported)}")
    if margs.get("r") is not None:
        _rank(model, margs["r"])
    model.requires_grad_(False)
    model.head.requires_grad_(True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return entry.apply(model, **margs)


def trainable_parameter_count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _is_bias(key):
    return key.rsplit(".", 1)[-1] == "bias"


def export_state_dict(state_dict, method):
    """The tensors `method` changes, from a full LTModel state dict ("backbone.", "head.", "adapters." keys).

    peft methods (LoRA) are exported with peft's save_pretrained instead.
    """
    entry = METHODS.get(method)
    if entry.peft:
        raise ValueError(f"export_state_dict does not handle {method!r}: peft methods are exported with save_pretrained")
    # BatchNorm running statistics move whenever the backbone runs in train mode, whatever trains: always kept
    return {k: v for k, v in state_dict.items() if entry.exports(k) or is_running_stat(k)}
