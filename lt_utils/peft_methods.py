"""The built-in methods' attach functions (declared, with their configs, in methods.py) and what they share: where
a backbone's blocks are, LoRA through peft, LIFT's LoRA init. Module methods add peft_modules.MODULES, which also
rebuilds them from an export's recorded method config.
"""
import contextlib
import math
import re

import torch
from torch import nn

from . import peft_modules as PM
from .errors import UserError, require
from .methods import METHODS, LoraMlpConfig, MethodConfig, bottleneck_dim, method_config
from .peft_modules import AdaptFormer
from .models import BACKBONES, LTModel, unwrap_lt_model

__all__ = [
    "METHODS", "AdaptFormer", "apply_method", "bottleneck_dim", "encoder_layers", "merge_lora_state_dict",
    "trainable_parameter_count", "unwrap_lt_model",
]


def encoder_layers(backbone, kind=None):
    """[(layer, second LayerNorm, MLP branch)] for each transformer block, in order (wiring: BACKBONES[kind])."""
    kinds = [kind] if kind else BACKBONES.names()
    return PM.encoder_layers(backbone, [w for k in kinds for w in BACKBONES.get(k).layer_wiring])


def _attach_adaptformer(lt, r, partial_layers=None):
    layers = encoder_layers(lt.backbone, lt.spec.kind)
    if len(layers) != lt.spec.num_layers:
        raise RuntimeError(f"found {len(layers)} encoder layers, config says {lt.spec.num_layers}")
    lt.adapters = PM.MODULES["adaptformer"](lt, {"r": r, "partial_layers": partial_layers},
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


def _check_rank(model, r):
    if model.adapters is not None:  # rebuilt from an AdaptFormer export: train those adapters further
        require(model.adapters.method == "adaptformer",
                f"the model already has {model.adapters.method} modules; --method adaptformer cannot add its own")
        existing = model.adapters[0].down.out_features
        if existing != r:
            raise UserError(f"the model already has AdaptFormer adapters of r={existing}, not {r}")
        return True
    return False


# ---- the built-in methods' attach functions: f(lt_model, config) -> the model to train (see methods.py) --------
def attach_adaptformer(model, config):
    if _check_rank(model, config.r):
        model.adapters.requires_grad_(True)
    else:
        _attach_adaptformer(model, config.r, config.partial_layers)
    return model


def attach_lora(model, config):
    return _wrap_lora(model, config.r, config.lora_alpha, config.lora_dropout, config.lora_target_modules,
                      config.partial_layers, isinstance(config, LoraMlpConfig), config.lora_init)


def _tune_blocks(select, tunes_adapters):
    """Tunes existing weights of the blocks (LIFT: embeddings, pre/post LayerNorm stay frozen). select(name, module):
    whether the parameter `name` (relative to its block) of `module` (its owner) trains."""
    def attach(model, config):
        blocks, _, _ = transformer_blocks(model)
        for block in PM.last_blocks(blocks, config.partial_layers):  # validated by apply_method
            for module_name, module in block.named_modules():
                for name, param in module.named_parameters(recurse=False):
                    param.requires_grad_(select(name, module))
        if model.adapters is not None:  # rebuilt from an export with added modules: they are part of the blocks
            model.adapters.requires_grad_(tunes_adapters)
        return model
    return attach


attach_full_blocks = _tune_blocks(lambda name, module: True, tunes_adapters=True)
attach_bitfit = _tune_blocks(lambda name, module: name == "bias", tunes_adapters=False)
attach_layer_norms = _tune_blocks(lambda name, module: isinstance(module, nn.LayerNorm), tunes_adapters=False)


def attach_full_all(model, config):
    model.backbone.requires_grad_(True)
    if model.adapters is not None:
        model.adapters.requires_grad_(True)
    return model


def attach_bitfit_all(model, config):
    for name, param in model.backbone.named_parameters():
        param.requires_grad_(_is_bias(name))
    return model


def attach_head(model, config):
    return model


def attach_modules(model, config):
    """Adds the method's inference-time modules (peft_modules.MODULES[name], built from the config's record, as an
    export rebuilds them) to the tuned blocks, kept in `model.adapters`; they and the head train."""
    if model.adapters is not None:
        require(model.adapters.method == config.name,
                f"the model already has {model.adapters.method} modules; --method {config.name} cannot add its own")
    else:
        transformer_blocks(model)  # a one-line error for a backbone without blocks
        try:  # the modules' one definition, shared with the remote-code model of exports
            model.adapters = PM.MODULES[config.name](model, config.to_record(), BACKBONES.get(model.spec.kind))
        except ValueError as err:
            raise UserError(f"--method {config.name}: {err}") from None
        model.adapters.method = config.name
    model.adapters.requires_grad_(True)
    return model


def supported_methods(kind):
    """The --method names that apply to a BACKBONES kind."""
    entry = BACKBONES.get(kind)
    names = METHODS.names() if entry.methods is None else entry.methods  # a whitelist keeps its own order
    return [m for m in names if m in METHODS and m not in entry.excluded_methods]


def apply_method(model, method, seed=0, **settings):
    """Set what trains (the head always does) and add the method's modules (AdaptFormer, VPT, SSF, peft LoRA, ...).

    method: a MethodConfig (methods.method_config), or a --method name with its `settings` (r, lora_alpha,
    partial_layers, ...; r None -> bottleneck_dim(K, L)). New modules are initialised from `seed`, so repeated builds
    match. A model that already has adapters (rebuilt from an export with modules) keeps them: they train under their
    own method and "full"/"full_all", and stay frozen otherwise.
    """
    if not isinstance(model, LTModel):
        raise TypeError(f"apply_method takes an LTModel from build_lt_model, not {type(model).__name__}")
    config = method if isinstance(method, MethodConfig) else \
        method_config(method, model.num_classes, model.spec.num_layers, **settings)
    entry = METHODS.get(config.name)
    supported = supported_methods(model.spec.kind)
    if config.name not in supported:
        raise UserError(f"--method {config.name} does not apply to {model.spec.kind} backbones; choose one of "
                        f"{', '.join(supported)}")
    if config.partial_layers is not None:
        require(entry.partial, f"--partial_layers applies to methods that tune blocks, not --method {config.name}")
        tuned_range(model.spec.num_layers, config.partial_layers)
    model.requires_grad_(False)
    model.head.requires_grad_(True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = entry.attach_function()(model, config)
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
