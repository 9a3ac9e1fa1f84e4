"""Inference-time modules that fine-tuning methods add to a backbone (AdaptFormer, ...).

Self-contained on purpose (torch only, no other lt_utils import): exports ship this file as transformers remote
code, so a model loads with transformers alone. Training-side logic (what trains, exports, rebuilds) stays in
peft_methods.py.
"""
import math

import torch
from torch import nn


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
