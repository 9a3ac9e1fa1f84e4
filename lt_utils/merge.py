"""How a soup combines the ingredients' tensors of one key: the registry MERGE_METHODS (soup.py --merge_method).

A soup's mode picks the ingredients and their weights w_1 .. w_N (and the anchor's w_0, all summing to 1); the merge
method decides how their tensors T_i combine. Methods are pure tensor math on one key at a time, so a soup still
streams, whatever files the tensors come from. Task vectors are tau_i = T_i - anchor, the anchor being the zero-shot
model (base weights + head init); all is float64.

  average           sum_j w_j * T_j over (anchor, ingredients): uniform, weighted, progressive, greedy soups and
                    WiSE-FT (the default)
  task_arithmetic   anchor + scaling * sum_i w_i * tau_i
  ties              each tau_i trimmed to its `density` largest entries by magnitude; per entry the sign of the sum
                    of the trimmed values (total) or of the most of them (frequency) is elected, and the entries of
                    that sign are averaged (disjoint mean); anchor + scaling * that
  dare_linear       each tau_i entry dropped with probability 1 - density, the kept ones divided by density, then
                    combined as task_arithmetic
  dare_ties         the same drops, then ties' sign election and disjoint mean

With weights, the disjoint mean is sum_i w_i m_i tau_i / sum_i w_i m_i (m_i: tau_i kept with the elected sign),
times sum_i w_i: equal weights summing to 1 give the plain disjoint mean, and --alpha (which scales every w_i)
still moves the soup toward the anchor as it does for average. The sign is elected from the unweighted values, as
peft's merge_utils do. Trimming ranks the entries of one tensor at a time (a soup streams: it never holds a whole
model).

A DARE drop mask depends only on (--merge_seed, key, ingredient id): neither the order of the keys nor the other
ingredients change it, so a greedy candidate and the final soup drop the same entries of an ingredient.

    @merge_method("name")
    def name(inputs, density=0.5, scaling=1.0): ...   # its flags (named as in lt_utils.config.FLAGS) and defaults

registers a method; soup.py offers it at once (--merge_method's choices are this registry's names).
"""
import dataclasses
import hashlib
import inspect
import math
from typing import Sequence

import torch

from .axes import MERGE_METHODS  # the --merge_method names; the built-in methods are below
from .errors import UserError


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    merge: object  # (KeyInputs, **params) -> float64 tensor
    defaults: dict  # its parameters (named as their flags) and their defaults
    task_vectors: bool  # combines T_i - anchor, so it needs the anchor (the base model) for every key
    elects_sign: bool  # a weighted disjoint mean, which only non-negative weights make a mean


def method_of(merge, task_vectors=True, elects_sign=False):
    """The MergeMethod of merge(inputs, **params): its keyword parameters and defaults are the method's flags."""
    defaults = {p.name: p.default for p in list(inspect.signature(merge).parameters.values())[1:]}
    return MergeMethod(merge, defaults, task_vectors, elects_sign)


def merge_method(name, task_vectors=True, elects_sign=False):
    """Register merge(inputs, **params) under `name` (the built-in ones are declared in lt_utils.axes)."""
    def add(merge):
        MERGE_METHODS.register(name, method_of(merge, task_vectors, elects_sign))
        return merge

    return add


@dataclasses.dataclass
class KeyInputs:
    """One key's inputs. `tensors[i]` is ingredient i's tensor in its stored dtype, read
    when asked for, so a method that streams holds one at a time."""

    key: str
    tensors: Sequence
    weights: Sequence  # w_1 .. w_N, one per ingredient
    anchor_weight: float = 0.0  # w_0
    anchor: torch.Tensor = None  # None where neither the method nor w_0 uses it
    ids: Sequence = None  # stable ingredient ids (DARE's seeds); default 0 .. N-1

    def ingredient_ids(self):
        return list(range(len(self.weights))) if self.ids is None else list(self.ids)


def _scaled(tensor, weight):
    # a float64 copy times w, then a plain add: add_(alpha=w) may fuse (FMA) and round differently from w * t + acc
    return tensor.to(torch.float64, copy=True).mul_(weight)


def average(inputs):
    acc = _scaled(inputs.tensors[0], inputs.weights[0])
    for i in range(1, len(inputs.weights)):
        if inputs.weights[i]:  # zero-weight ingredients are not read
            acc.add_(_scaled(inputs.tensors[i], inputs.weights[i]))
    if inputs.anchor_weight:
        acc.add_(_scaled(inputs.anchor, inputs.anchor_weight))
    return acc


def task_vectors(inputs):
    """tau_i = T_i - anchor in float64, one at a time."""
    anchor = inputs.anchor.to(torch.float64)
    return (tensor.to(torch.float64) - anchor for tensor in inputs.tensors)


def task_arithmetic(inputs, scaling=1.0):
    delta = sum(w * tau for w, tau in zip(inputs.weights, task_vectors(inputs)))
    return inputs.anchor.to(torch.float64) + scaling * delta


def ties(inputs, density=0.2, majority_sign_method="total", scaling=1.0):
    trimmed = torch.stack([trim(tau, density) for tau in task_vectors(inputs)])
    return inputs.anchor.to(torch.float64) + scaling * disjoint_mean(trimmed, inputs.weights, majority_sign_method)


def dare_linear(inputs, density=0.1, merge_seed=0, scaling=1.0):
    delta = sum(w * tau for w, tau in zip(inputs.weights, dropped(inputs, density, merge_seed)))
    return inputs.anchor.to(torch.float64) + scaling * delta


def dare_ties(inputs, density=0.1, majority_sign_method="total", merge_seed=0, scaling=1.0):
    kept = torch.stack(list(dropped(inputs, density, merge_seed)))
    return inputs.anchor.to(torch.float64) + scaling * disjoint_mean(kept, inputs.weights, majority_sign_method)


# the built-in methods, by the names lt_utils.axes declares
AVERAGE = method_of(average, task_vectors=False)
TASK_ARITHMETIC = method_of(task_arithmetic)
TIES = method_of(ties, elects_sign=True)
DARE_LINEAR = method_of(dare_linear)
DARE_TIES = method_of(dare_ties, elects_sign=True)


def trim(tau, density):
    """tau with all but its int(density * numel) largest-magnitude entries set to 0."""
    if density >= 1:
        return tau
    mask = torch.zeros(tau.numel(), dtype=tau.dtype)
    mask[tau.abs().flatten().topk(int(density * tau.numel())).indices] = 1
    return tau * mask.view(tau.shape)


def dropped(inputs, density, merge_seed):
    """Each tau_i with every entry kept with probability `density` (the rest 0), the kept ones divided by it."""
    for ingredient_id, tau in zip(inputs.ingredient_ids(), task_vectors(inputs)):
        if density >= 1:
            yield tau
            continue
        generator = torch.Generator().manual_seed(drop_seed(merge_seed, inputs.key, ingredient_id))
        yield tau * torch.bernoulli(torch.full_like(tau, density), generator=generator) / density


def drop_seed(merge_seed, key, ingredient_id):
    """The drop mask's own seed: a hash of (seed, ingredient, key), so it is independent of the key order."""
    digest = hashlib.blake2b(f"{merge_seed}/{ingredient_id}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def disjoint_mean(taus, weights, majority_sign_method):
    """Per entry: the sign elected from the stacked `taus`, then sum_i w_i tau_i / sum_i w_i over the i that have it
    (0 where none has), times sum_i w_i."""
    signs = taus.sign()
    votes = taus.sum(dim=0) if majority_sign_method == "total" else signs.sum(dim=0)
    agree = signs == torch.where(votes >= 0, 1.0, -1.0).to(taus.dtype)  # pruned entries (0) never agree
    w = torch.tensor(list(weights), dtype=taus.dtype).view(-1, *[1] * (taus.dim() - 1))
    total = (agree * w).sum(dim=0)
    mean = (taus * agree * w).sum(dim=0) / torch.where(total > 0, total, 1.0)
    return mean * math.fsum(weights)


# ------------------------------------------------------------------------------------------------ user checks
def merge_params(name, given):
    """The method's parameters: the given values (flag name -> value, None = not given) over its defaults; a value
    given for a parameter it does not take is refused (it would silently change nothing)."""
    method = MERGE_METHODS.get(name)
    for flag, value in given.items():
        if value is not None and flag not in method.defaults:
            takers = [n for n in MERGE_METHODS if flag in MERGE_METHODS.get(n).defaults]
            raise UserError(f"--{flag} has no effect with --merge_method {name}; drop it"
                            + (f" or choose --merge_method {' / '.join(takers)}" if takers else ""))
    return {flag: default if given.get(flag) is None else given[flag] for flag, default in method.defaults.items()}


def check_merge_weights(name, weights):
    """Sign-electing methods take a weighted mean of the agreeing entries: a negative weight makes it no mean."""
    negative = [w for w in weights if w < 0]
    if MERGE_METHODS.get(name).elects_sign and negative:
        raise UserError(f"--merge_method {name} averages the entries of the elected sign, which needs weights >= 0 "
                        f"(got {negative[0]:g}); pass non-negative --weights or use --merge_method task_arithmetic")
