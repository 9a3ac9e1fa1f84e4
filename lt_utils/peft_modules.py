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


# ---- LIFT's other inference-time modules -------------------------------------------------------------------
# A transformer block's parts are named by role; `parts` maps a role to its dotted path inside the block (the
# backbone's BACKBONES entry gives it: CLIP ln_1 = "layer_norm1", q = "self_attn.q_proj", ...). Roles: ln_1, ln_2,
# q, k, v, attn_out, mlp, fc1, fc2.
def block_part(block, parts, role):
    module = block
    for name in parts[role].split("."):
        module = getattr(module, name)
    return module


class VisualPrompts(nn.Module):
    """VPT: `length` learned tokens appended to the sequence before a block; tokens appended by an earlier block
    are dropped first (the sequence is cut to `seq_len`, CLS + patches). Init U(+-sqrt(6 / (3 p^2 + D)))."""

    def __init__(self, length, dim, patch_size, seq_len):
        super().__init__()
        self.seq_len = int(seq_len)
        self.prompt = nn.Parameter(torch.empty(length, dim))
        bound = math.sqrt(6.0 / float(3 * patch_size * patch_size + dim))
        nn.init.uniform_(self.prompt, -bound, bound)

    def forward(self, x):
        x = x[:, : self.seq_len, :]
        return torch.cat([x, self.prompt.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)


class PromptHook:
    """Forward pre-hook (with kwargs) of a block: its hidden states (first argument) get the prompts."""

    def __init__(self, prompts):
        self.prompts = prompts

    def __call__(self, module, args, kwargs):
        if args:
            return (self.prompts(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self.prompts(kwargs["hidden_states"])}


class Adapter(nn.Module):
    """Sequential bottleneck (Houlsby/LIFT `adapter`): x + Up(ReLU(Down(LN(x)))) on the MLP's output; Up starts at
    zero, so it starts as a no-op."""

    def __init__(self, dim, r):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, r)
        self.up = nn.Linear(r, dim)
        nn.init.kaiming_normal_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.up(torch.relu(self.down(self.norm(x))))


class AddToOutput:
    """Forward hook: output + module(output) (the sequential adapter after the MLP)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, module, args, output):
        return output + self.module(output)


class ScaleShift(nn.Module):
    """SSF: x * scale + shift per feature; scale ~ N(1, 0.02), shift ~ N(0, 0.02) (LIFT's init)."""

    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim))
        self.shift = nn.Parameter(torch.empty(dim))
        nn.init.normal_(self.scale, mean=1.0, std=0.02)
        nn.init.normal_(self.shift, std=0.02)

    def forward(self, x, lo=0, hi=None):
        return x * self.scale[lo:hi] + self.shift[lo:hi]


class ScaleShiftOutput:
    """Forward hook applying features [lo, hi) of a ScaleShift to a module's output (q, k and v share one SSF of
    3D features, as LIFT's on the fused qkv projection)."""

    def __init__(self, ssf, lo=0, hi=None):
        self.ssf, self.lo, self.hi = ssf, lo, hi

    def __call__(self, module, args, output):
        return self.ssf(output, self.lo, self.hi)


class MaskedEntries(nn.Module):
    """Sparse fine-tuning of several Linears: the entries at each one's flat weight / bias indices (ascending) are
    trained copies that replace the frozen ones in its forward. All copies live in ONE parameter `values` (Linear by
    Linear, weights then biases): a Linear may get no entry at all, and DeepSpeed ZeRO-3 cannot partition an empty
    parameter. The indices are derived from the seed, so they are buffers, not stored."""

    def __init__(self, linears, indices):
        super().__init__()
        chunks, self.spans = [], []
        start = 0
        for i, (linear, (w_idx, b_idx)) in enumerate(zip(linears, indices)):
            self.register_buffer(f"weight_index_{i}", w_idx, persistent=False)
            self.register_buffer(f"bias_index_{i}", b_idx, persistent=False)
            chunks += [linear.weight.detach().reshape(-1)[w_idx], linear.bias.detach()[b_idx]]
            self.spans.append((start, start + len(w_idx), start + len(w_idx) + len(b_idx)))
            start = self.spans[-1][2]
        self.values = nn.Parameter(torch.cat(chunks).clone())

    def indices(self, i):
        return getattr(self, f"weight_index_{i}"), getattr(self, f"bias_index_{i}")

    def forward(self, linear, i):
        """(weight, bias) of Linear `i` with its trained entries in place. Called as a module so that DeepSpeed
        ZeRO-3 gathers `values` (it gathers a module's parameters around its forward)."""
        w_idx, b_idx = self.indices(i)
        start, mid, end = self.spans[i]
        values = self.values.to(linear.weight.dtype)
        weight = linear.weight.reshape(-1).index_put((w_idx,), values[start:mid]).view_as(linear.weight)
        return weight, linear.bias.index_put((b_idx,), values[mid:end])


class MaskedForward:
    """Replaces Linear `i`'s forward: F.linear with its masked entries taken from `entries` (LIFT's MaskedLinear)."""

    def __init__(self, linear, entries, i):
        self.linear, self.entries, self.i = linear, entries, i

    def __call__(self, x):
        return nn.functional.linear(x, *self.entries(self.linear, self.i))


def lift_mask_indices(shapes, ratio, generator):
    """LIFT's random mask of one (fused) linear map: `shapes` = [(out_i, in)] of the Linears it stacks (q, k, v for
    the attention input). Over the stacked [sum(out_i), in + 1] matrix (bias as last column), int(n * ratio) entries
    are drawn by randperm(n) from `generator`; returns [(weight flat indices, bias indices)] per Linear, ascending."""
    fan_in = shapes[0][1]
    rows = sum(out for out, _ in shapes)
    n = rows * (fan_in + 1)
    chosen = torch.randperm(n, generator=generator)[: int(n * ratio)].sort().values
    row, col = chosen // (fan_in + 1), chosen % (fan_in + 1)
    result, start = [], 0
    for out, _ in shapes:
        mine = (row >= start) & (row < start + out)
        r, c = row[mine] - start, col[mine]
        is_bias = c == fan_in
        result.append((r[~is_bias] * fan_in + c[~is_bias], r[is_bias]))
        start += out
    return result


def lift_mask_ratio(num_classes, num_layers, dim):
    """LIFT's default: K / (12 L D), floored to a multiple of 0.001, at least 0.001 (its float arithmetic)."""
    ratio = num_classes / (12 * num_layers * dim)
    return max(0.001, ratio // 0.001 * 0.001)


def attach_masks(blocks, parts, ratio, seed):
    """Masked entries of the attention input (q, k, v fused), attention output, MLP in and out of each block, drawn
    in LIFT's order from one generator seeded with `seed`; returns the MaskedEntries (Linears in that order)."""
    generator = torch.Generator().manual_seed(int(seed))
    linears, indices = [], []
    for block in blocks:
        for roles in (("q", "k", "v"), ("attn_out",), ("fc1",), ("fc2",)):
            group = [block_part(block, parts, role) for role in roles]
            drawn = lift_mask_indices([tuple(m.weight.shape) for m in group], ratio, generator)
            linears += group
            indices += [(w.to(m.weight.device), b.to(m.weight.device)) for m, (w, b) in zip(group, drawn)]
    if sum(len(w) + len(b) for w, b in indices) == 0:
        raise ValueError(f"a mask ratio of {ratio} selects no entry of these blocks")
    entries = MaskedEntries(linears, indices)
    for i, linear in enumerate(linears):
        linear.forward = MaskedForward(linear, entries, i)
    return entries


def attach_prompts(blocks, length, dim, patch_size, seq_len, deep):
    """VPT prompts before the first block (shallow) or before every block (deep)."""
    out = nn.ModuleList()
    for block in blocks if deep else blocks[:1]:
        prompts = VisualPrompts(length, dim, patch_size, seq_len).to(_device(block))
        block.register_forward_pre_hook(PromptHook(prompts), with_kwargs=True)
        out.append(prompts)
    return out


def attach_adapters(blocks, parts, dim, r):
    out = nn.ModuleList()
    for block in blocks:
        adapter = Adapter(dim, r).to(_device(block))
        block_part(block, parts, "mlp").register_forward_hook(AddToOutput(adapter))
        out.append(adapter)
    return out


# SSF placements (LIFT): role -> [(hooked part, first feature, last feature)] sharing one ScaleShift per role
SSF_PLACES = {
    "ssf_attn": {"attn_in": ("q", "k", "v"), "attn_out": ("attn_out",)},
    "ssf_mlp": {"mlp_in": ("fc1",), "mlp_out": ("fc2",)},
    "ssf_ln": {"ln_1": ("ln_1",), "ln_2": ("ln_2",)},
}


def attach_scale_shift(blocks, parts, where):
    """SSF after the parts named by SSF_PLACES[where]; parts fused in LIFT (q, k, v) share one ScaleShift."""
    out = nn.ModuleList()
    for block in blocks:
        ssfs = nn.ModuleDict()
        for name, roles in SSF_PLACES[where].items():
            modules = [block_part(block, parts, role) for role in roles]
            sizes = [_out_features(m) for m in modules]
            ssfs[name] = ScaleShift(sum(sizes)).to(_device(block))
            lo = 0
            for module, size in zip(modules, sizes):
                module.register_forward_hook(ScaleShiftOutput(ssfs[name], lo, lo + size))
                lo += size
        out.append(ssfs)
    return out


def _out_features(module):
    return module.out_features if isinstance(module, nn.Linear) else module.normalized_shape[0]


def _device(module):
    return next(module.parameters()).device
