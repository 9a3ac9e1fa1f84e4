"""Inference-time modules that fine-tuning methods add to a backbone (AdaptFormer, ...).

Self-contained on purpose (torch only, no other lt_utils import): exports ship this file as transformers remote
code, so a model loads with transformers alone. Training-side logic (what trains, exports, rebuilds) stays in
peft_methods.py.
"""
import math

import torch
from torch import nn

# method name -> attach(lt_model, record, wiring): creates a method's inference modules on an LTModel and hooks them
# into the backbone; `record` is the method's config as an export records it (lt_utils.methods: {"name", "r",
# "partial_layers", ...}). Training and the remote-code model (modeling_lt.py, reading config.json) both call it, so a
# method's modules plug in by registering here.
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
    """VPT: `length` learned tokens appended to the sequence before a block; with `drop_previous` the tokens the
    previous block's prompts appended are dropped first (VPT-deep). Init U(+-sqrt(6 / (3 p^2 + D)))."""

    def __init__(self, length, dim, patch_size, drop_previous=False):
        super().__init__()
        self.drop_previous = bool(drop_previous)
        self.prompt = nn.Parameter(torch.empty(length, dim))
        bound = math.sqrt(6.0 / float(3 * patch_size * patch_size + dim))
        nn.init.uniform_(self.prompt, -bound, bound)

    def forward(self, x):
        if self.drop_previous:
            x = x[:, : x.shape[1] - self.prompt.shape[0], :]
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
    parameter. The indices are derived from the seed, so they are not stored, and they are plain CPU tensors rather
    than buffers: transformers' from_pretrained builds models on the meta device and would leave a non-persistent
    buffer unfilled. Each device gets its own copy on first use."""

    def __init__(self, linears, indices):
        super().__init__()
        chunks, self.spans = [], []
        start = 0
        self._indices = [(w.cpu(), b.cpu()) for w, b in indices]
        self._on_device = {}
        for linear, (w_idx, b_idx) in zip(linears, self._indices):
            if linear.weight.is_meta:  # transformers' from_pretrained builds on the meta device, then loads `values`
                chunks += [torch.empty(len(w_idx) + len(b_idx), device="meta")]
            else:
                chunks += [linear.weight.detach().reshape(-1)[w_idx.to(linear.weight.device)],
                           linear.bias.detach()[b_idx.to(linear.weight.device)]]
            self.spans.append((start, start + len(w_idx), start + len(w_idx) + len(b_idx)))
            start = self.spans[-1][2]
        self.values = nn.Parameter(torch.cat(chunks).clone())

    def indices(self, i, device="cpu"):
        device = torch.device(device)
        if device not in self._on_device:
            self._on_device[device] = [(w.to(device), b.to(device)) for w, b in self._indices]
        return self._on_device[device][i]

    def forward(self, linear, i):
        """(weight, bias) of Linear `i` with its trained entries in place. Called as a module so that DeepSpeed
        ZeRO-3 gathers `values` (it gathers a module's parameters around its forward)."""
        w_idx, b_idx = self.indices(i, linear.weight.device)
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
    # on the CPU explicitly: the indices are data, also when the model is built on the meta device
    chosen = torch.randperm(n, generator=generator, device="cpu")[: int(n * ratio)].sort().values
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
            indices += drawn
    if sum(len(w) + len(b) for w, b in indices) == 0:
        raise ValueError(f"a mask ratio of {ratio} selects no entry of these blocks; raise --mask_ratio")
    entries = MaskedEntries(linears, indices)
    for i, linear in enumerate(linears):
        linear.forward = MaskedForward(linear, entries, i)
    return entries


def attach_prompts(blocks, length, dim, patch_size, deep):
    """VPT prompts before the first block (shallow) or before every block (deep)."""
    out = nn.ModuleList()
    for i, block in enumerate(blocks if deep else blocks[:1]):
        prompts = VisualPrompts(length, dim, patch_size, drop_previous=i > 0).to(_device(block))
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


# ---- where modules go: blocks by role, the last k blocks ----------------------------------------------------
def find_blocks(backbone, wiring):
    """(blocks in order, {role: dotted path}, dotted path of the block list) of a backbone. `wiring`: anything with
    `block_lists` (candidate dotted paths of the block list, first present wins) and `block_parts` (role ->
    candidate paths inside a block): the project's BACKBONES entry when training, the export's LTConfig when loaded."""
    for path in wiring.block_lists:
        blocks = _get_path(backbone, path)
        if blocks is not None:
            break
    else:
        raise ValueError("the backbone has no transformer blocks; LIFT's block methods need a ViT")
    parts = {role: next((c for c in candidates if _get_path(blocks[0], c) is not None), candidates[0])
             for role, candidates in wiring.block_parts.items()}
    return list(blocks), parts, path


def _get_path(module, path):
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def last_blocks(items, partial_layers):
    """The tuned ones: all, or the last `partial_layers` (LIFT's `partial`; validated by the caller)."""
    return list(items) if partial_layers is None else list(items)[len(items) - int(partial_layers):]


def _tuned_blocks(lt_model, arch, wiring):
    blocks, parts, _ = find_blocks(lt_model.backbone, wiring)
    return last_blocks(blocks, arch.get("partial_layers")), parts, len(blocks)


def _patch_size(backbone):
    size = getattr(backbone.config, "patch_size", 16)
    return size[0] if isinstance(size, (tuple, list)) else int(size)


# ---- one attach function per method: training (peft_methods) and the remote-code model both call these --------
@register_modules("adaptformer")
def attach_adaptformer(lt_model, arch, wiring):
    """One AdaptFormer of r = arch["r"] beside each tuned block's MLP (hooks: AdapterHooks)."""
    layers = last_blocks(encoder_layers(lt_model.backbone, wiring.layer_wiring), arch.get("partial_layers"))
    dim = layers[0][1].normalized_shape[0]
    adapters = nn.ModuleList(AdaptFormer(dim, int(arch["r"])) for _ in layers).to(_device(lt_model.backbone))
    for adapter, (_, norm, mlp) in zip(adapters, layers):
        hooks = AdapterHooks(adapter)
        norm.register_forward_pre_hook(hooks.capture)
        mlp.register_forward_hook(hooks.add)
    return adapters


def _prompts(deep):
    def attach(lt_model, arch, wiring):
        blocks, parts, _ = _tuned_blocks(lt_model, arch, wiring)
        dim = block_part(blocks[0], parts, "ln_1").normalized_shape[0]
        return attach_prompts(blocks, int(arch["vpt_len"]), dim, _patch_size(lt_model.backbone), deep)
    return attach


register_modules("vpt_shallow")(_prompts(deep=False))
register_modules("vpt_deep")(_prompts(deep=True))


@register_modules("adapter")
def attach_sequential_adapters(lt_model, arch, wiring):
    blocks, parts, _ = _tuned_blocks(lt_model, arch, wiring)
    dim = block_part(blocks[0], parts, "ln_1").normalized_shape[0]
    return attach_adapters(blocks, parts, dim, int(arch["r"]))


def _scale_shift(where):
    def attach(lt_model, arch, wiring):
        blocks, parts, _ = _tuned_blocks(lt_model, arch, wiring)
        return attach_scale_shift(blocks, parts, where)
    return attach


for _where in SSF_PLACES:
    register_modules(_where)(_scale_shift(_where))


@register_modules("mask")
def attach_sparse_masks(lt_model, arch, wiring):
    """Masked entries drawn from arch["mask_seed"]; arch["mask_ratio"] None is LIFT's rule K / (12 L D)."""
    blocks, parts, num_blocks = _tuned_blocks(lt_model, arch, wiring)
    ratio = arch.get("mask_ratio")
    if ratio is None:
        dim = block_part(blocks[0], parts, "ln_1").normalized_shape[0]
        ratio = lift_mask_ratio(lt_model.head.weight.shape[0], num_blocks, dim)
    return attach_masks(blocks, parts, ratio, arch.get("mask_seed", 0))
