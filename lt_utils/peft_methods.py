"""Fine-tuning methods (`--method`): one METHODS entry each owns what trains and the modules it adds (their one
definition is peft_modules.MODULES, which also rebuilds them from an export's config), plus LoRA through peft.

A new method is one subclass of `Method` registered in METHODS (see README, "Extending").
"""
import contextlib
import math
import re

import torch
from torch import nn

from . import peft_modules as PM
from .errors import UserError, require
from .peft_modules import AdaptFormer
from .models import BACKBONES, LTModel, unwrap_lt_model
from .registry import Registry

__all__ = [
    "METHODS", "AdaptFormer", "Method", "apply_method", "bottleneck_dim", "empty_arch", "encoder_layers",
    "merge_lora_state_dict", "trainable_parameter_count", "unwrap_lt_model",
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
    return PM.encoder_layers(backbone, [w for k in kinds for w in BACKBONES.get(k).layer_wiring])


def _attach_adaptformer(lt, r, partial_layers=None):
    layers = encoder_layers(lt.backbone, lt.spec.kind)
    if len(layers) != lt.spec.num_layers:
        raise RuntimeError(f"found {len(layers)} encoder layers, config says {lt.spec.num_layers}")
    lt.adapters = PM.MODULES["adaptformer"](lt, {"adapter_dim": r, "partial_layers": partial_layers},
                                            BACKBONES.get(lt.spec.kind))
    lt.adapters.method = "adaptformer"


def transformer_blocks(lt):
    """(blocks in order, {role: dotted path}, block list path) of the backbone (BACKBONES[kind] wiring)."""
    try:
        return PM.find_blocks(lt.backbone, BACKBONES.get(lt.spec.kind))
    except ValueError:
        raise UserError(f"the {lt.spec.kind} backbone has no transformer blocks; LIFT's methods need a ViT") from None


def tuned_range(num_layers, partial_layers=None):
    """(first, end) of the blocks a method tunes: all, or the last `partial_layers` (LIFT's `partial`)."""
    if partial_layers is None:
        return 0, num_layers
    require(1 <= int(partial_layers) <= num_layers,
            f"--partial_layers {partial_layers}: the backbone has {num_layers} blocks; pass 1..{num_layers}")
    return num_layers - int(partial_layers), num_layers


_BLOCK_KEY = re.compile(r"^backbone\.(?:.*\.)?layers?\.(\d+)\.")


def block_index(key):
    """The block an LTModel state-dict key belongs to (None outside the blocks)."""
    match = _BLOCK_KEY.match(key)
    return int(match.group(1)) if match else None


def default_lora_targets(backbone, kind):
    """q and v projections (LIFT parity): the first of BACKBONES[kind].lora_targets present in the backbone."""
    names = _linear_leaf_names(backbone)
    candidates = BACKBONES.get(kind).lora_targets
    return list(next((c for c in candidates if set(c) <= names), candidates[-1]))


def _linear_leaf_names(backbone):
    return {name.rsplit(".", 1)[-1] for name, m in backbone.named_modules() if isinstance(m, nn.Linear)}


def _lora_pattern(lt, target_modules, partial_layers, mlp):
    """peft's full-name regex: LoRA on the backbone only (never the head), in the tuned blocks."""
    if mlp:  # the two Linears of each block's MLP, by path (a ViT 4.x leaf name "dense" is also attention's)
        _, parts, _ = transformer_blocks(lt)
        inner = "(" + "|".join(re.escape(parts[role]) for role in ("fc1", "fc2")) + ")"
    else:
        if isinstance(target_modules, str):
            target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
        targets = list(target_modules or default_lora_targets(lt.backbone, lt.spec.kind))
        unknown = sorted(set(targets) - _linear_leaf_names(lt.backbone))
        if unknown:
            choices = sorted(_linear_leaf_names(lt.backbone))
            raise UserError(f"LoRA targets {unknown} are not Linear layers of the backbone; choose from {choices}")
        inner = r"(.*\.)?(" + "|".join(re.escape(t) for t in targets) + ")"
    if partial_layers is None and not mlp:
        return r"backbone\..*\." + inner.removeprefix(r"(.*\.)?")
    _, _, list_path = transformer_blocks(lt)
    first, end = tuned_range(lt.spec.num_layers, partial_layers)
    return rf"backbone\.{re.escape(list_path)}\.({'|'.join(map(str, range(first, end)))})\." + inner


def _wrap_lora(lt, r, lora_alpha, lora_dropout, target_modules, partial_layers=None, mlp=False, init="peft"):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=_lora_pattern(lt, target_modules, partial_layers, mlp),
        bias="none",
        modules_to_save=["head"],
    )
    with _backbone_heads_hidden(lt):
        model = get_peft_model(lt, config)
    if init == "lift":
        _lift_lora_init(model)
    return model


@contextlib.contextmanager
def _backbone_heads_hidden(lt):
    """peft finds `modules_to_save=["head"]` by name suffix, so a backbone module also named `head` (SigLIP's
    attention-pool head) would be trained and exported as a copy too: such modules are detached while peft wraps
    the model (LoRA stays in the encoder), then put back in place."""
    hidden = [(parent, list(parent._modules)) for key, parent in lt.backbone.named_modules()
              if isinstance(parent._modules.get("head"), nn.Module)]
    removed = [(parent, order, parent._modules.pop("head")) for parent, order in hidden]
    try:
        yield
    finally:
        for parent, order, module in removed:
            children = {**parent._modules, "head": module}
            parent._modules.clear()
            parent._modules.update((name, children[name]) for name in order if name in children)


def _lift_lora_init(model):
    """LIFT's LoRA init: its A is a (D, r) tensor, so Kaiming-uniform (a=sqrt(5)) draws U(+-1/sqrt(r)), where peft's
    (r, D) nn.Linear weight draws U(+-1/sqrt(D)). Drawn as LIFT does (a (D, r) tensor, blocks in order, targets in
    name order) and stored transposed; B stays zero."""
    modules = [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    modules.sort(key=lambda nm: (block_index(nm[0].removeprefix("base_model.model.")) or 0, nm[0].rsplit(".", 1)[-1]))
    with torch.no_grad():
        for _, module in modules:
            weight = module.lora_A["default"].weight
            lift_a = torch.empty(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
            nn.init.kaiming_uniform_(lift_a, a=math.sqrt(5))
            weight.copy_(lift_a.T)


LORA_INITS = ("peft", "lift")


def empty_arch():
    """The architecture record of a plain LTModel (backbone + head): no added modules."""
    return {"adapters": None, "adapter_dim": None}


class Method:
    """Everything one `--method` decides. Subclass, override what differs, register an instance in METHODS.

    Exports record `arch` (modules beyond backbone + head) in their config: `arch["adapters"]` names the method
    whose modules live in the LTModel (peft_modules.MODULES rebuilds them), `arch["partial_layers"]` the number of
    last blocks tuned (absent: all). LoRA is merged into the exported weights; its settings are the plain peft
    adapter's adapter_config.json.
    """

    trains = ""  # what trains, for --help and the README
    # exports can be averaged tensor by tensor: the trained tensors are weights (or re-parameterise them: SSF, masks;
    # LoRA as exact deltas merged into the weights) or adapter weights of one seeded init; not prompts (tokens)
    soupable = True
    init_from = False  # --init_from accepts it: it trains on top of an export's (LoRA-merged) weights
    head_only = False  # nothing before the head trains: train_lt.py trains the head alone on cached features
    peft = False  # exported with peft's save_pretrained (adapter_model.safetensors) instead of model.safetensors
    partial = True  # --partial_layers applies (the method tunes blocks)

    def method_args(self, method, num_classes, num_layers):
        """The settings that shape this method's modules (`method`: the run's spec.MethodSpec), as `apply` takes them."""
        k = method.partial_layers
        return {"partial_layers": k} if k is not None else {}

    def arch(self, margs):
        """The entries of the export's architecture record this method sets (see the class docstring)."""
        k = margs.get("partial_layers")
        return {"partial_layers": k} if k is not None else {}

    def apply(self, model, **margs):
        """Mark what trains (all starts frozen but the head) and add modules; returns the model to train."""
        return model


METHODS = Registry("method", flag="--method")


def _rank(model, r):
    r = bottleneck_dim(model.num_classes, model.spec.num_layers) if r is None else int(r)
    if r < 1:
        raise UserError(f"adapter/LoRA rank r must be >= 1, got {r}")
    return r


def _lift_rank(method, num_classes, num_layers):
    return method.adapter_dim or bottleneck_dim(num_classes, num_layers)


class AdaptFormerMethod(Method):
    trains = "AdaptFormer bottlenecks beside each MLP (r from LIFT's rule, or --adapter_dim)"

    def method_args(self, method, num_classes, num_layers):
        return {**super().method_args(method, num_classes, num_layers), "r": _lift_rank(method, num_classes, num_layers)}

    def arch(self, margs):
        return {**super().arch(margs), "adapters": "adaptformer", "adapter_dim": margs["r"]}

    def apply(self, model, r=None, partial_layers=None, **_):
        r = _rank(model, r)
        if model.adapters is not None:  # rebuilt from an AdaptFormer export: train those adapters further
            require(model.adapters.method == "adaptformer",
                    f"the model already has {model.adapters.method} modules; --method adaptformer cannot add its own")
            existing = model.adapters[0].down.out_features
            if existing != r:
                raise UserError(f"the model already has AdaptFormer adapters of r={existing}, not {r}")
            model.adapters.requires_grad_(True)
        else:
            _attach_adaptformer(model, r, partial_layers)
        return model


class LoraMethod(Method):
    trains = "peft LoRA on q_proj,v_proj (--lora_target_modules), r from LIFT's rule, alpha 1"
    peft = True
    mlp = False

    def method_args(self, method, num_classes, num_layers):
        if self.mlp:
            require(not method.lora_target_modules, "--method lora_mlp sets its targets (the MLP's two Linears); drop "
                                                    "--lora_target_modules or use --method lora")
        targets = method.lora_target_modules  # the spec holds a tuple; peft and the export record take a list
        return {**super().method_args(method, num_classes, num_layers), "r": _lift_rank(method, num_classes, num_layers),
                "lora_alpha": method.lora_alpha, "lora_dropout": method.lora_dropout,
                "lora_target_modules": list(targets) if targets is not None else None, "lora_init": method.lora_init}

    def apply(self, model, r=None, lora_alpha=1.0, lora_dropout=0.0, lora_target_modules=None, partial_layers=None,
              lora_init="peft", **_):
        return _wrap_lora(model, _rank(model, r), lora_alpha, lora_dropout, lora_target_modules, partial_layers,
                          self.mlp, lora_init or "peft")


class LoraMlpMethod(LoraMethod):
    trains = "peft LoRA on the two Linears of each MLP (fc1, fc2), r from LIFT's rule, alpha 1"
    mlp = True


class BlockMethod(Method):
    """Tunes existing weights of the blocks (LIFT: embeddings, pre/post LayerNorm stay frozen)."""

    init_from = True

    def select(self, name, module):
        """Whether the parameter `name` (relative to its block) of `module` (its owner) trains."""
        return True

    def apply(self, model, partial_layers=None, **_):
        blocks, _, _ = transformer_blocks(model)
        for block in PM.last_blocks(blocks, partial_layers):  # validated by apply_method
            for module_name, module in block.named_modules():
                for name, param in module.named_parameters(recurse=False):
                    param.requires_grad_(self.select(name, module))
        if model.adapters is not None:  # rebuilt from an export with added modules: they are part of the blocks
            model.adapters.requires_grad_(self.tunes_adapters)
        return model

    tunes_adapters = False


class FullBlocksMethod(BlockMethod):
    trains = "every weight of the transformer blocks (LIFT's full fine-tuning; embeddings and pre/post LN frozen)"
    tunes_adapters = True


class FullAllMethod(Method):
    trains = "every weight (embeddings, blocks, pre/post LN, adapters of an --init_from export, head; LT-Soups)"
    init_from = True
    partial = False

    def apply(self, model, **_):
        model.backbone.requires_grad_(True)
        if model.adapters is not None:
            model.adapters.requires_grad_(True)
        return model


class BitFitMethod(BlockMethod):
    trains = "the biases of the transformer blocks (LIFT's BitFit)"

    def select(self, name, module):
        return name == "bias"


class BitFitAllMethod(Method):
    trains = "every bias of the backbone (embeddings and pre/post LN too; BatchNorm shifts of a CNN)"
    init_from = True
    partial = False

    def apply(self, model, **_):
        for name, param in model.backbone.named_parameters():
            param.requires_grad_(_is_bias(name))
        return model


class LayerNormMethod(BlockMethod):
    trains = "the LayerNorms of the transformer blocks (weights and biases)"

    def select(self, name, module):
        return isinstance(module, nn.LayerNorm)


class HeadMethod(Method):
    trains = "the head only, on cached features (LOS / LT-Soups stage 2)"
    init_from = True
    head_only = True
    partial = False


class ModuleMethod(Method):
    """Adds inference-time modules (peft_modules) to the tuned blocks, kept in `model.adapters`; they and the head
    train. `arch_keys`: the method arguments its export records, so peft_modules.MODULES re-attaches the same modules."""

    arch_keys = ()

    def resolve(self, model, **margs):
        """The method arguments with defaults filled in and checked (the attach function takes them as `arch`)."""
        return margs

    def arch(self, margs):
        return {**super().arch(margs), "adapters": self.name, "adapter_dim": margs.get("r"),
                **{k: margs[k] for k in self.arch_keys}}

    def apply(self, model, partial_layers=None, **margs):
        if model.adapters is not None:
            require(model.adapters.method == self.name,
                    f"the model already has {model.adapters.method} modules; --method "
                    f"{self.name} cannot add its own")
        else:
            transformer_blocks(model)  # a one-line error for a backbone without blocks
            arch = self.arch({**self.resolve(model, **margs), "partial_layers": partial_layers})
            try:  # the modules' one definition, shared with the remote-code model of exports
                model.adapters = PM.MODULES[self.name](model, arch, BACKBONES.get(model.spec.kind))
            except ValueError as err:
                raise UserError(f"--method {self.name}: {err}") from None
            model.adapters.method = self.name
        model.adapters.requires_grad_(True)
        return model

    @property
    def name(self):
        return next(n for n in METHODS if METHODS.get(n) is self)


class PromptMethod(ModuleMethod):
    soupable = False  # prompts are input tokens: an average of tokens is no average of the models' weights
    arch_keys = ("vpt_len",)
    deep = False

    def method_args(self, method, num_classes, num_layers):
        return {**super().method_args(method, num_classes, num_layers), "vpt_len": method.vpt_len}

    def resolve(self, model, vpt_len=10, **margs):
        require(vpt_len >= 1, f"--vpt_len must be >= 1, got {vpt_len}")
        return {**margs, "vpt_len": vpt_len}


class ShallowPromptMethod(PromptMethod):
    trains = "VPT-shallow: --vpt_len (10) prompt tokens before the first tuned block"


class DeepPromptMethod(PromptMethod):
    trains = "VPT-deep: --vpt_len (10) new prompt tokens before every tuned block"
    deep = True


class AdapterMethod(ModuleMethod):
    trains = "sequential bottleneck adapters after each MLP (r from LIFT's rule, or --adapter_dim)"

    def method_args(self, method, num_classes, num_layers):
        return {**super().method_args(method, num_classes, num_layers), "r": _lift_rank(method, num_classes, num_layers)}

    def resolve(self, model, r=None, **margs):
        return {**margs, "r": _rank(model, r)}


class ScaleShiftMethod(ModuleMethod):
    def __init__(self, trains):
        self.trains = trains


class MaskMethod(ModuleMethod):
    trains = ("sparse fine-tuning: random entries of every Linear of the blocks (LIFT's ratio K/(12 L D), floored "
              "to 0.001, or --mask_ratio; --mask_seed)")
    arch_keys = ("mask_ratio", "mask_seed")

    def method_args(self, method, num_classes, num_layers):  # mask_ratio None: LIFT's rule, resolved from the model
        return {**super().method_args(method, num_classes, num_layers), "mask_seed": method.mask_seed,
                "mask_ratio": method.mask_ratio}

    def resolve(self, model, mask_ratio=None, mask_seed=0, **margs):  # ratio None: LIFT's rule, in the attach
        require(mask_ratio is None or 0 < mask_ratio <= 1, f"--mask_ratio must be in (0, 1], got {mask_ratio}")
        return {**margs, "mask_ratio": mask_ratio, "mask_seed": mask_seed}


METHODS.register("adaptformer", AdaptFormerMethod())
METHODS.register("lora", LoraMethod())
METHODS.register("full", FullBlocksMethod())
METHODS.register("bitfit", BitFitMethod())
METHODS.register("head", HeadMethod())
METHODS.register("full_all", FullAllMethod())
METHODS.register("bitfit_all", BitFitAllMethod())
METHODS.register("ln", LayerNormMethod())
METHODS.register("vpt_shallow", ShallowPromptMethod())
METHODS.register("vpt_deep", DeepPromptMethod())
METHODS.register("adapter", AdapterMethod())
METHODS.register("mask", MaskMethod())
METHODS.register("lora_mlp", LoraMlpMethod())
METHODS.register("ssf_attn", ScaleShiftMethod("SSF scale and shift after the attention's q, k, v and output "
                                              "projections"))
METHODS.register("ssf_mlp", ScaleShiftMethod("SSF scale and shift after the MLP's two Linears"))
METHODS.register("ssf_ln", ScaleShiftMethod("SSF scale and shift after the blocks' two LayerNorms"))


def supported_methods(kind):
    """The --method names that apply to a BACKBONES kind."""
    entry = BACKBONES.get(kind)
    names = METHODS.names() if entry.methods is None else entry.methods  # a whitelist keeps its own order
    return [m for m in names if m in METHODS and m not in entry.excluded_methods]


def apply_method(model, method, seed=0, **margs):
    """Set what trains (the head always does) and add the method's modules (AdaptFormer, VPT, SSF, peft LoRA, ...).

    margs: the method's arguments (r, lora_alpha, partial_layers, ...; r None -> bottleneck_dim(K, L)). New modules
    are initialised from `seed`, so repeated builds match. A model that already has adapters (rebuilt from an
    export with modules) keeps them: they train under their own method and "full"/"full_all", and stay frozen
    otherwise.
    """
    entry = METHODS.get(method)
    if not isinstance(model, LTModel):
        raise TypeError(f"apply_method takes an LTModel from build_lt_model, not {type(model).__name__}")
    supported = supported_methods(model.spec.kind)
    if method not in supported:
        raise UserError(f"--method {method} does not apply to {model.spec.kind} backbones; choose one of "
                        f"{', '.join(supported)}")
    if margs.get("r") is not None:
        _rank(model, margs["r"])
    if margs.get("partial_layers") is not None:
        require(entry.partial, f"--partial_layers applies to methods that tune blocks, not --method {method}")
        tuned_range(model.spec.num_layers, margs["partial_layers"])
    model.requires_grad_(False)
    model.head.requires_grad_(True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = entry.apply(model, **margs)
    params = dict(unwrap_lt_model(model).backbone.named_parameters())
    for name in BACKBONES.get(unwrap_lt_model(model).spec.kind).unused_parameters:
        if name in params:
            params[name].requires_grad_(False)
    return model


def trainable_parameter_count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def head_parameter_count(model):
    """Trainable parameters of the head (plain, or peft's modules_to_save copy); not a backbone's own `head`."""
    return sum(p.numel() for n, p in model.named_parameters()
               if p.requires_grad and n.removeprefix("base_model.model.").startswith("head."))


def _is_bias(key):
    name = key.rsplit(".", 1)[-1]
    return name == "bias" or name.endswith("_bias")  # nn.MultiheadAttention's in_proj_bias (SigLIP's pool head)


_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.default\.weight$")


def merge_lora_state_dict(state_dict, lora_config):
    """(LTModel state dict with LoRA merged in, LoRA factors) of a peft LoRA model's state dict.

    Each target's weight is base + (B @ A) * scaling, computed as peft's merge does (in float32 for 16-bit weights,
    then cast back); the head is peft's trained copy (modules_to_save). The factors keep LTModel module names:
    backbone.<module>.lora_A.weight."""
    scaling = lora_config.lora_alpha / (math.sqrt(lora_config.r) if lora_config.use_rslora else lora_config.r)
    plain, factors, lora = {}, {}, {}
    for key, value in state_dict.items():
        key = key.removeprefix(_PEFT_PREFIX)
        match = _LORA_KEY.match(key)
        if match:
            factors.setdefault(match["module"], {})[match["ab"]] = value
            lora[f"{match['module']}.lora_{match['ab']}.weight"] = value
        elif ".original_module." in key:
            continue  # the head as it was before training; modules_to_save holds the trained copy
        else:
            plain[key.replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")] = value
    for module, ab in factors.items():
        weight = plain[f"{module}.weight"]
        delta = ab["B"].float() @ ab["A"].float() * scaling
        plain[f"{module}.weight"] = (weight.float() + delta).to(weight.dtype)
    return plain, lora
