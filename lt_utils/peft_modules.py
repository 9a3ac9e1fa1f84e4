"""Inference-time modules that fine-tuning methods add to a backbone (AdaptFormer, ...).

Self-contained on purpose (torch only, no other lt_utils import): exports ship this file as transformers remote
code, so a model loads with transformers alone. Training-side logic (what trains, exports, rebuilds) stays in
peft_methods.py.
"""
import math

import torch
from torch import nn

# arch["adapters"] name -> attach(lt_model, arch, layer_wiring): re-creates a method's inference modules on an LTModel
# (sets lt_model.adapters and hooks them into the backbone). The remote-code model (modeling_lt.py) calls it with the
# record its config holds, so a new method's modules plug in by registering here.
MODULES = {}


def register_modules(name):
    def add(attach):
        if name in MODULES:
            raise ValueError(f"modules {name!r} are already registered")
        MODULES[name] = attach
        return attach

    return add


def encoder_layers(backbone, layer_wiring):
    """[(layer, second LayerNorm, MLP branch)] for each transformer block, in order; layer_wiring: candidate
    (LayerNorm, MLP) attribute-name pairs, the first present in a block wins."""
    layers = []
    for module in backbone.modules():
        for norm_name, mlp_name in layer_wiring:
            if isinstance(getattr(module, norm_name, None), nn.LayerNorm) and hasattr(module, mlp_name):
                layers.append((module, getattr(module, norm_name), getattr(module, mlp_name)))
                break
    return layers


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


class AdapterHooks:
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


@register_modules("adaptformer")
def attach_adaptformer(lt_model, arch, layer_wiring):
    """One AdaptFormer of r = arch["adapter_dim"] beside each block's MLP (hooks: AdapterHooks)."""
    layers = encoder_layers(lt_model.backbone, layer_wiring)
    dim = layers[0][1].normalized_shape[0]
    device = next(lt_model.backbone.parameters()).device
    lt_model.adapters = nn.ModuleList(AdaptFormer(dim, int(arch["adapter_dim"])) for _ in layers).to(device)
    for adapter, (_, norm, mlp) in zip(lt_model.adapters, layers):
        hooks = AdapterHooks(adapter)
        norm.register_forward_pre_hook(hooks.capture)
        mlp.register_forward_hook(hooks.add)
    return lt_model
