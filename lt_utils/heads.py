"""Classifier heads (the data-dependent initialisations live in head_init.py)."""
import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from .axes import HEADS  # the --head_type names; their classes are below


def random_head_init(num_classes, dim, seed):
    """Seeded uniform(-1, 1) rows renormalised to unit norm (LIFT's uninitialised default); always on CPU."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    weight = torch.rand(num_classes, dim, generator=generator, device="cpu", dtype=torch.float32) * 2 - 1
    return F.normalize(weight, dim=-1)


class CosineHead(nn.Module):
    """scale * <x/|x|, w/|w|>, no bias (LIFT uses scale 25)."""

    def __init__(self, num_classes, dim, scale=25.0, seed=0):
        super().__init__()
        self.weight = nn.Parameter(random_head_init(num_classes, dim, seed))
        self.scale = float(scale)

    def forward(self, x):
        return self.scale * F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))

    def extra_repr(self):
        return f"num_classes={self.weight.shape[0]}, dim={self.weight.shape[1]}, scale={self.scale}"


class LinearHead(nn.Module):
    """Plain affine classifier; seeded unit-norm rows and a zero bias by default (`scale` does not apply)."""

    def __init__(self, num_classes, dim, scale=None, seed=0):
        super().__init__()
        self.weight = nn.Parameter(random_head_init(num_classes, dim, seed))
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class L2NormedHead(nn.Module):
    """<x, w/|w|>: unit-norm class rows, raw features, no scale or bias (LIFT's L2NormedClassifier)."""

    def __init__(self, num_classes, dim, scale=None, seed=0):
        super().__init__()
        self.weight = nn.Parameter(random_head_init(num_classes, dim, seed))

    def forward(self, x):
        return F.linear(x, F.normalize(self.weight, dim=-1))


class LayerNormedHead(L2NormedHead):
    """<LayerNorm(x), w/|w|>, the LayerNorm without affine parameters, eps 1e-12 (LIFT's LayerNormedClassifier)."""

    def forward(self, x):
        x = F.layer_norm(x, x.shape[-1:], eps=1e-12)
        return F.linear(x, F.normalize(self.weight, dim=-1))


def build_head(head_type, num_classes, dim, scale=25.0, seed=0):
    return HEADS.get(head_type)(num_classes, dim, scale=scale, seed=seed)


def fingerprint(tensor):
    """sha256 over shape and float32 bytes: identical init <=> identical hash."""
    t = tensor.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(str(tuple(t.shape)).encode())
    digest.update(t.numpy().tobytes())
    return digest.hexdigest()
