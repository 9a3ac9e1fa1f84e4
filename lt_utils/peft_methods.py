"""Fine-tuning methods (`--method`): which parameters train, plus the AdaptFormer and LoRA modules."""
import math
import re

import torch
from torch import nn

from .errors import UserError
from .models import LTModel, build_lt_model, unwrap_lt_model

METHODS = ("full", "bitfit", "adaptformer", "lora", "head")
__all__ = [
    "METHODS", "AdaptFormer", "apply_method", "bottleneck_dim", "build_method_model", "encoder_layers",
    "export_state_dict", "trainable_parameter_count", "unwrap_lt_model",
]

# (second LayerNorm, MLP branch) attribute names per encoder layer: CLIP, ViT (transformers 5), ViT (4.x).
_LAYER_WIRING = (("layer_norm2", "mlp"), ("layernorm_after", "mlp"), ("layernorm_after", "output"))


def bottleneck_dim(num_classes, num_layers):
    """LIFT's rule 2**max(0, floor(log2(K / (2L)))), in exact integer arithmetic."""
    dim = 1
    while dim * 2 * 2 * num_layers <= num_classes:
        dim *= 2
    return dim


class AdaptFormer(nn.Module):
    """Parallel bottleneck beside an MLP: s * Up(ReLU(Down(LN(h)))); Up starts at zero, so it starts as a no-op."""

    def __init__(self, dim, r):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, r)
        self.up = nn.Linear(r, dim)
        self.scale = nn.Parameter(torch.ones(()))
        nn.init.kaiming_normal_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        return self.scale * self.up(torch.relu(self.down(self.norm(h))))


class _AdapterHooks:
    """Captures the residual stream at the layer's second LayerNorm and adds the adapter to the MLP output.

    A picklable object (not a closure) so that deepcopy (EMA copies) rebinds the hooks to the copied adapter.
    """

    def __init__(self, adapter):
        self.adapter = adapter
        self.h = None

    def capture(self, module, args):
        self.h = args[0]

    def add(self, module, args, output):
        h, self.h = self.h, None
        return output + self.adapter(h)


def encoder_layers(backbone):
    """[(layer, second LayerNorm, MLP branch)] for each transformer block, in order."""
    layers = []
    for module in backbone.modules():
        for norm_name, mlp_name in _LAYER_WIRING:
            if isinstance(getattr(module, norm_name, None), nn.LayerNorm) and hasattr(module, mlp_name):
                layers.append((module, getattr(module, norm_name), getattr(module, mlp_name)))
                break
    return layers


def _attach_adaptformer(lt, r):
    layers = encoder_layers(lt.backbone)
    if len(layers) != lt.spec.num_layers:
        raise RuntimeError(f"found {len(layers)} encoder layers, config says {lt.spec.num_layers}")
    device = next(lt.backbone.parameters()).device
    lt.adapters = nn.ModuleList(AdaptFormer(lt.spec.hidden_size, r) for _ in layers).to(device)
    for adapter, (_, norm, mlp) in zip(lt.adapters, layers):
        hooks = _AdapterHooks(adapter)
        norm.register_forward_pre_hook(hooks.capture)
        mlp.register_forward_hook(hooks.add)


def default_lora_targets(backbone):
    """q and v projections (LIFT parity): q_proj/v_proj (CLIP, ViT in transformers 5) or query/value (older ViT)."""
    names = _linear_leaf_names(backbone)
    return ["q_proj", "v_proj"] if "q_proj" in names else ["query", "value"]


def _linear_leaf_names(backbone):
    return {name.rsplit(".", 1)[-1] for name, m in backbone.named_modules() if isinstance(m, nn.Linear)}


def _wrap_lora(lt, r, lora_alpha, lora_dropout, target_modules):
    from peft import LoraConfig, get_peft_model

    if isinstance(target_modules, str):
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    targets = list(target_modules or default_lora_targets(lt.backbone))
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


def apply_method(model, method, r=None, lora_alpha=1.0, lora_dropout=0.0, lora_target_modules=None, seed=0):
    """Set what trains (the head always does); add AdaptFormer adapters or wrap in a peft LoRA model.

    `r` None -> bottleneck_dim(K, L). New modules are initialised from `seed`, so repeated builds match.
    A model that already has adapters (rebuilt from an AdaptFormer export) keeps them: they train under
    "adaptformer" and "full", and stay frozen otherwise.
    """
    if method not in METHODS:
        raise UserError(f"unknown --method {method!r}; use one of {', '.join(METHODS)}")
    if not isinstance(model, LTModel):
        raise TypeError(f"apply_method takes an LTModel from build_lt_model, not {type(model).__name__}")
    r = bottleneck_dim(model.num_classes, model.spec.num_layers) if r is None else int(r)
    if r < 1:
        raise UserError(f"adapter/LoRA rank r must be >= 1, got {r}")
    model.requires_grad_(False)
    model.head.requires_grad_(True)
    if method == "full":
        model.backbone.requires_grad_(True)
        if model.adapters is not None:
            model.adapters.requires_grad_(True)
    elif method == "bitfit":
        for name, param in model.backbone.named_parameters():
            param.requires_grad_(name.rsplit(".", 1)[-1] == "bias")
    elif method == "adaptformer" and model.adapters is not None:
        if model.adapters[0].down.out_features != r:
            existing = model.adapters[0].down.out_features
            raise UserError(f"the model already has AdaptFormer adapters of r={existing}, not {r}")
        model.adapters.requires_grad_(True)
        return model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if method == "adaptformer":
            _attach_adaptformer(model, r)
        elif method == "lora":
            return _wrap_lora(model, r, lora_alpha, lora_dropout, lora_target_modules)
    return model


def trainable_parameter_count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _is_bias(key):
    return key.rsplit(".", 1)[-1] == "bias"


_EXPORT_FILTERS = {
    "full": lambda k: True,
    "bitfit": lambda k: k.startswith("head.") or (k.startswith("backbone.") and _is_bias(k)),
    "adaptformer": lambda k: k.startswith(("head.", "adapters.")),
    "head": lambda k: k.startswith("head."),
}


def export_state_dict(state_dict, method):
    """The tensors `method` changes, from a full LTModel state dict ("backbone.", "head.", "adapters." keys).

    LoRA is exported with peft's save_pretrained instead.
    """
    if method not in _EXPORT_FILTERS:
        raise ValueError(
            f"export_state_dict handles {sorted(_EXPORT_FILTERS)}, not {method!r} (LoRA: save_pretrained)"
        )
    keep = _EXPORT_FILTERS[method]
    return {k: v for k, v in state_dict.items() if keep(k)}


def build_method_model(
    model_name_or_path, num_classes, method, method_args, head_type, head_scale, from_scratch=False, seed=0
):
    """build_lt_model + apply_method with stored arguments (used when re-loading an export)."""
    model = build_lt_model(
        model_name_or_path, num_classes, head_type, head_scale, from_scratch=from_scratch, seed=seed
    )
    return apply_method(model, method, **(method_args or {}))
