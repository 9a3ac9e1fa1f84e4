"""Model soups over export dirs: ingredients, compatibility checks, weights per mode, a streaming merge, the manifest.

Every soup is one weight vector over (anchor, ingredient_1 .. ingredient_N), summing to 1. The anchor is the
zero-shot model the ingredients were fine-tuned from: the base weights plus `head_init.safetensors`.

  uniform       anchor 0, 1/N each
  weighted      anchor 0, `--weights` as given (they must sum to 1, or pass `normalize`)
  progressive   LT-Soups' running merge in the given order: soup = (1-lam)*soup + lam*F_k, starting from the anchor;
                7 ingredients at lam 0.7 weigh 0.0002 (anchor), 0.0005, ..., 0.21, 0.70 (last)
  greedy        model-soups' greedy recipe: ranked by val score, an ingredient joins only if the soup's val score
                strictly improves; the kept ones are averaged uniformly
  alpha < 1     WiSE-FT on top of any mode: (1-alpha)*anchor + alpha*soup

The mode decides the weights; `merge_method` (lt_utils.merge) how the weighted tensors combine: averaged (default,
the soups above), or as task vectors from the anchor (task arithmetic, TIES, DARE).

LoRA ingredients are merged as exact deltas, base W + sum_i w_i * scale_i * B_i @ A_i (never A and B averaged
apart), and the soup is a plain export (no adapter). Tensors are read one at a time with `safe_open` and summed
in float64, so peak memory is about the output plus, when the anchor or LoRA needs it, the base model, whatever N
(ties and dare_ties also hold one key's tensor of every ingredient).
"""
import collections.abc
import dataclasses
import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import torch

from .config import FLAGS, recorded_flags
from .metrics import check_select_metric, selection_score
from .checkpoint import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, HEAD_INIT_FILE, WEIGHTS_FILE, check_finite, read_export_meta,
                         read_tensors, resolve_export_dir, write_export)
from .errors import UserError, require
from .fileio import atomic_write_json, check_outputs_apart, check_writable_dir, read_json
from .merge import MERGE_METHODS, KeyInputs, check_merge_weights, merge_params

MODES = ("uniform", "weighted", "progressive", "greedy")
MANIFEST_FILE = "soup_manifest.json"
# BatchNorm statistics are measured, not trained: a trimmed or dropped variance is no variance, so they are averaged
BN_STATS = ("running_mean", "running_var")
COPIED_FILES = ("lt_info.json",)  # the Hub-native files are written by write_export
# peft's saved LoRA factor keys: "base_model.model.<module>.lora_A.weight" (adapter name stripped on save)
_LORA_FACTOR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")
_PEFT_PREFIX = "base_model.model."


# ------------------------------------------------------------------------------------------------ ingredients
@dataclasses.dataclass
class Entry:
    """Where one LTModel tensor of an ingredient lives. A LoRA target is base + scaling * B @ A."""

    shape: tuple
    dtype: str  # safetensors dtype name ("F32", "BF16", "I64"); None for a LoRA target (the base's dtype)
    file: str
    key: str  # key in `file` (a LoRA target: its lora_A key)
    lora_b: str = None
    scaling: float = None

    @property
    def is_float(self):
        return self.dtype is None or self.dtype.startswith(("F", "BF"))


@dataclasses.dataclass
class Ingredient:
    name: str  # as given by the user (a path or a Hub id)
    path: Path  # local export dir
    meta: dict
    entries: dict  # LTModel key -> Entry

    @property
    def is_lora(self):
        return bool(self.meta["arch"].get("lora"))


def read_ingredient(source):
    """An export dir (local or Hub id) and where each of its tensors lives; reads safetensors headers only."""
    path = resolve_export_dir(source)
    meta = read_export_meta(path)
    _check_soupable(meta, source)
    entries = _file_entries(path, WEIGHTS_FILE) if meta.get("has_weights_file") else {}
    if meta["arch"].get("lora"):
        for key, entry in _lora_entries(path).items():
            require(key not in entries, f"{source}: {key} is both in {WEIGHTS_FILE} and in the LoRA adapter; re-export it")
            entries[key] = entry
    require(entries, f"{source} holds no tensors to merge (no {WEIGHTS_FILE}, no adapter); re-export it")
    read_tensors(path / HEAD_INIT_FILE)  # readable and finite: a soup's anchor and card come from it
    return Ingredient(str(source), path, meta, entries)


def _check_soupable(meta, source):
    """A method whose exports are not linear in their tensors cannot be averaged (a soup of soups can)."""
    from .peft_methods import METHODS

    method = meta.get("method")
    require(method not in METHODS or METHODS.get(method).soupable,
            f"{source} was trained with --method {method}, whose exports cannot be averaged; leave it out of the soup")


def _header(file_path):
    from safetensors import safe_open

    try:
        with safe_open(str(file_path), framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as err:  # truncated, empty or garbage bytes
        raise UserError(f"{file_path} is not a readable safetensors file ({err.__class__.__name__}); it is truncated "
                        "or corrupted, re-export it") from None


def _file_entries(path, file_name):
    return {k: Entry(shape, dtype, file_name, k) for k, (shape, dtype) in _header(path / file_name).items()}


def _lora_entries(path):
    """LoRA targets as exact deltas, plus the adapter's plain tensors (the head saved as modules_to_save)."""
    config = read_json(path / ADAPTER_CONFIG, "adapter config")
    require(isinstance(config, dict), f"{path / ADAPTER_CONFIG} is not a mapping; re-export it")
    _check_lora_config(config, path)
    header = _header(path / ADAPTER_WEIGHTS)
    entries, factors = {}, {}
    for key, (shape, dtype) in header.items():
        match = _LORA_FACTOR.match(key)
        if match:
            factors.setdefault(match["module"], {})[match["ab"]] = key
        elif ".lora_" in key:
            raise UserError(f"{path}: adapter tensor {key} is not a plain LoRA factor; only LoRA A/B adapters can be souped")
        else:
            entries[key.removeprefix(_PEFT_PREFIX)] = Entry(shape, dtype, ADAPTER_WEIGHTS, key)
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    for module, ab in factors.items():
        require(set(ab) == {"A", "B"}, f"{path}: LoRA module {module} lacks its lora_{'B' if 'A' in ab else 'A'}; re-export it")
        (r_a, fan_in), (fan_out, r_b) = header[ab["A"]][0], header[ab["B"]][0]
        require(r_a == r_b == rank, f"{path}: LoRA module {module} has rank {r_a}/{r_b}, adapter_config.json says {rank}")
        entries[module + ".weight"] = Entry((fan_out, fan_in), None, ADAPTER_WEIGHTS, ab["A"], ab["B"], scaling)
    return entries


def _check_lora_config(config, path):
    """Only plain LoRA has an exact delta scaling * B @ A with one (r, alpha) per adapter."""
    unsupported = {"use_dora": config.get("use_dora"), "rank_pattern": config.get("rank_pattern"),
                   "alpha_pattern": config.get("alpha_pattern"), "fan_in_fan_out": config.get("fan_in_fan_out"),
                   "lora_bias": config.get("lora_bias")}
    used = [name for name, value in unsupported.items() if value]
    require(config.get("peft_type", "LORA") == "LORA" and not used,
            f"{path}: the adapter uses {used or config.get('peft_type')}; soups merge plain LoRA adapters only")


# ----------------------------------------------------------------------------------------------- compatibility
_SAME_FIELDS = (
    ("base model", lambda m: m["base_model"]),
    ("from_scratch", lambda m: bool(m["from_scratch"])),
    ("backbone spec", lambda m: m["backbone"]),
    # the added modules and where they sit (method, r, tuned blocks, prompt length, mask ratio and seed)
    ("adapters", lambda m: {k: v for k, v in m["arch"].items() if k != "lora"}),
    ("LoRA use (LoRA and non-LoRA exports do not mix)", lambda m: bool(m["arch"].get("lora"))),
    ("num_labels", lambda m: m["num_labels"]),
    ("id2label", lambda m: m["id2label"]),
    ("head type/scale", lambda m: (m["head"]["type"], m["head"]["scale"])),
    ("head init", lambda m: m["head"]["init_fingerprint"]),
    # a from-scratch backbone is the seeded random init: another seed is another starting point
    ("from-scratch seed", lambda m: m.get("seed") if m["from_scratch"] else None),
)


def check_compatible(ingredients):
    """Refuse a set that cannot be averaged: other base, labels, head init, architecture, keys or shapes."""
    names = [ing.name for ing in ingredients]
    dup = next((n for n in names if names.count(n) > 1), None)
    require(dup is None, f"{dup} is listed twice; pass each ingredient once (use --weights to weigh one more)")
    first = ingredients[0]
    for other in ingredients[1:]:
        for field, get in _SAME_FIELDS:
            a, b = get(first.meta), get(other.meta)
            require(a == b, f"cannot soup {first.name} with {other.name}: their {field} differ "
                            f"({_short(a)} vs {_short(b)}); soup runs fine-tuned from the same model, labels and head init")
        _check_same_tensors(first, other)


def _check_same_tensors(first, other):
    for a, b in ((first, other), (other, first)):
        extra = sorted(set(a.entries) - set(b.entries))
        require(not extra, f"cannot soup {first.name} with {other.name}: {a.name} has {len(extra)} tensors "
                           f"{b.name} lacks (e.g. {extra[0] if extra else ''}); they were trained with other methods")
    for key, entry in first.entries.items():
        theirs = other.entries[key]
        require(entry.shape == theirs.shape, f"cannot soup {first.name} with {other.name}: {key} has shape "
                                             f"{entry.shape} vs {theirs.shape}")
        require(entry.is_float == theirs.is_float, f"cannot soup {first.name} with {other.name}: {key} is "
                                                   f"{entry.dtype} vs {theirs.dtype}")


def _short(value):
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------------------------- weights
def soup_weights(mode, n, lam=0.7, weights=None, normalize=False):
    """[anchor, w_1 .. w_N] for uniform / weighted / progressive (greedy averages its kept subset uniformly)."""
    require(n >= 1, "a soup needs at least one ingredient")
    if mode == "uniform":
        return [0.0] + [1.0 / n] * n
    if mode == "weighted":
        return [0.0] + _explicit_weights(weights, n, normalize)
    if mode == "progressive":
        require(0.0 < lam <= 1.0, f"--lam {lam}: must be in (0, 1]; LT-Soups uses 0.7")
        mix = [1.0] + [0.0] * n  # starts as the anchor
        for k in range(1, n + 1):
            mix = [(1.0 - lam) * w for w in mix]
            mix[k] += lam
        return mix
    raise UserError(f"unknown soup mode {mode!r}; use one of {', '.join(MODES)}")


def _explicit_weights(weights, n, normalize):
    require(weights is not None and len(weights) == n,
            f"--weights needs one value per ingredient: got {0 if weights is None else len(weights)} for {n}; pass {n}")
    total = math.fsum(weights)
    if normalize:
        require(total > 0, f"--weights sum to {total:g}; --normalize needs a positive sum")
        return [w / total for w in weights]
    require(abs(total - 1.0) <= 1e-6, f"--weights sum to {total:g}, not 1; fix them or pass --normalize")
    return [float(w) for w in weights]


def with_alpha(weights, alpha):
    """WiSE-FT: (1 - alpha) * anchor + alpha * soup."""
    require(0.0 <= alpha <= 1.0, f"--alpha {alpha}: must be in [0, 1] (1 = no interpolation toward the zero-shot model)")
    return [(1.0 - alpha) + alpha * weights[0]] + [alpha * w for w in weights[1:]]


# ------------------------------------------------------------------------------------------------------ merge
def load_base_state(meta):
    """The pretrained (or seeded from-scratch) LTModel weights the ingredients started from."""
    from .checkpoint import build_from_meta

    return build_from_meta(meta).state_dict()


def needs_base(ingredients, weights, merge_method="average"):
    """LoRA targets are base + delta; a non-zero anchor or task vectors need the base for every non-head tensor."""
    anchored = weights[0] != 0 or MERGE_METHODS.get(merge_method).task_vectors
    return ingredients[0].is_lora or (anchored and any(not k.startswith("head.") for k in ingredients[0].entries))


def check_anchor_defined(ingredients, weights, merge_method="average"):
    adapters = [k for k in ingredients[0].entries if k.startswith("adapters.")]
    require(not (adapters and MERGE_METHODS.get(merge_method).task_vectors),
            f"--merge_method {merge_method} merges task vectors from the zero-shot anchor, which AdaptFormer adapters "
            "lack (their init is not stored); use --merge_method average")
    require(weights[0] == 0 or not adapters,
            "progressive soups and --alpha need the zero-shot anchor, which AdaptFormer adapters lack (their init is "
            "not stored); use --mode uniform, weighted or greedy without --alpha")


def ingredient_tensor(ing, key, base_state=None):
    """One tensor of an ingredient in LTModel terms (a LoRA target: base + scaling * B @ A, in float64)."""
    from safetensors import safe_open

    entry = ing.entries[key]
    path = ing.path / entry.file
    try:
        with safe_open(str(path), framework="pt") as f:
            if entry.lora_b is None:
                return _finite(f.get_tensor(entry.key), path, entry.key)
            lora_a, lora_b = f.get_tensor(entry.key).double(), f.get_tensor(entry.lora_b).double()
    except UserError:
        raise
    except Exception as err:  # bytes cut or changed after the header was read
        raise UserError(f"{path}: {entry.key} cannot be read ({err.__class__.__name__}); the file is truncated or "
                        "corrupted, re-export it") from None
    _finite(lora_a, path, entry.key)
    _finite(lora_b, path, entry.lora_b)
    return _base_tensor(base_state, key, ing.name).double() + entry.scaling * (lora_b @ lora_a)


def _finite(tensor, path, key):
    check_finite({key: tensor}, str(path), "the file is corrupted or its run diverged; leave this ingredient out")
    return tensor


def anchor_tensor(key, base_state, head_init):
    """The zero-shot model's tensor: the stored head init (a zero bias), else the base weight."""
    if key == "head.weight":
        return head_init["weight"]
    if key == "head.bias":
        return torch.zeros(head_init["weight"].shape[0], dtype=head_init["weight"].dtype)
    return _base_tensor(base_state, key, "the base model")


def _base_tensor(base_state, key, source):
    require(base_state is not None and key in base_state,
            f"{source}: {key} is not a tensor of the base model; the export and its base model do not match")
    return base_state[key]


def merge_tensors(ingredients, weights, base_state=None, head_init=None, progress=True, merge_method="average",
                  params=None, ids=None):
    """{key: merged tensor} over (anchor, ingredients) with weights [w_0, w_1 .. w_N], key by key in float64, cast to
    the first's dtype. Float tensors combine by `merge_method` with `params` (default: sum_j w_j * T_j); `ids`: the
    ingredients' stable ids (positions in the user's list; DARE's seeds).

    BatchNorm running means and variances are averaged like weights whatever the method; num_batches_tracked is the
    largest. Other integer tensors are copied from the first ingredient and must be equal in all of them.
    """
    from tqdm.auto import tqdm

    require(len(weights) == len(ingredients) + 1, "weights must be [anchor, one per ingredient]")
    method, average = MERGE_METHODS.get(merge_method), MERGE_METHODS.get("average")
    first, rest = ingredients[0], list(zip(ingredients[1:], weights[2:]))
    out = {}
    for key in tqdm(sorted(first.entries), desc="merge", disable=not progress):
        tensor = ingredient_tensor(first, key, base_state)
        if key.endswith("num_batches_tracked"):  # BatchNorm's step counter: the soup has seen the most steps of any
            out[key] = torch.stack([tensor] + [ingredient_tensor(ing, key) for ing, _ in rest]).max(dim=0).values
            continue
        if not first.entries[key].is_float:
            for ing, _ in rest:
                require(torch.equal(ingredient_tensor(ing, key), tensor),
                        f"{key} is an integer tensor that differs between {first.name} and {ing.name}; they cannot be souped")
            out[key] = tensor
            continue
        dtype = base_state[key].dtype if first.entries[key].lora_b else tensor.dtype
        chosen = average if key.endswith(BN_STATS) else method
        anchor = anchor_tensor(key, base_state, head_init) if weights[0] or chosen.task_vectors else None
        inputs = KeyInputs(key, _KeyTensors(ingredients, key, base_state, tensor), weights[1:], weights[0], anchor, ids)
        del tensor
        out[key] = chosen.merge(inputs, **((params or {}) if chosen is method else {})).to(dtype)
    return out


class _KeyTensors(collections.abc.Sequence):
    """One key's ingredient tensors, each read from its file when a merge method asks for it (the first is read)."""

    def __init__(self, ingredients, key, base_state, first):
        self._ingredients, self._key, self._base_state, self._first = ingredients, key, base_state, first

    def __len__(self):
        return len(self._ingredients)

    def __getitem__(self, i):
        if i == 0:
            return self._first
        return ingredient_tensor(self._ingredients[i], self._key, self._base_state)


def _merge_params(merge_method, merge_flags):
    """The method's parameters, each checked by the flag table as on the command line (callers of make_soup too)."""
    params = merge_params(merge_method, merge_flags)
    return {flag: FLAGS[flag].coerce(flag, value) if flag in FLAGS else value for flag, value in params.items()}


# ----------------------------------------------------------------------------------------------------- greedy
def stored_val_score(ing, metric):
    """The ingredient's val score saved by train_lt.py (best/metrics.json), or None."""
    path = ing.path / "metrics.json"
    if not path.is_file():
        return None
    saved = read_json(path, "metrics")
    value = selection_score(saved.get("val", {}) if isinstance(saved, dict) else {}, metric)
    return float(value) if isinstance(value, (int, float)) else None


def greedy_select(order, evaluate):
    """Model-soups' greedy soup. `order`: candidates best first; `evaluate(subset) -> score` (higher is better).

    Starts from the best alone; each next one is kept only if the uniform soup with it scores strictly higher.
    Returns (kept subset, steps [{"candidate", "score", "kept"}]).
    """
    kept = [order[0]]
    best = evaluate(kept)
    steps = [{"candidate": order[0], "score": best, "kept": True}]
    for candidate in order[1:]:
        score = evaluate(kept + [candidate])
        steps.append({"candidate": candidate, "score": score, "kept": score > best})
        if score > best:
            kept, best = kept + [candidate], score
    return kept, steps


def run_greedy(ingredients, scorer, metric, base_state=None, head_init=None, merge_method="average", params=None):
    """Rank by stored val score (evaluating those without one), then greedy_select with real val evaluations of the
    candidate soups, merged by `merge_method`."""
    def score_of(subset):
        tensors = merge_tensors([ingredients[i] for i in subset], [0.0] + [1.0 / len(subset)] * len(subset),
                                base_state, head_init, progress=False, merge_method=merge_method, params=params,
                                ids=subset)
        value = selection_score(scorer(tensors), metric)  # higher is better (NLLs negated)
        require(value is not None, f"the val split gives no {metric}; choose another --select_metric")
        return float(value)

    scores = [stored_val_score(ing, metric) for ing in ingredients]
    scores = [s if s is not None else score_of([i]) for i, s in enumerate(scores)]
    order = sorted(range(len(ingredients)), key=lambda i: -scores[i])  # stable: ties keep the given order
    kept, steps = greedy_select(order, score_of)
    for step in steps:
        step["candidate"] = ingredients[step["candidate"]].name
    return kept, scores, steps


def build_val_scorer(meta, lt_info_path, data_args, batch_size=256, num_workers=0):
    """tensors -> val metrics of the model they define; the val split is the ingredients' own unless overridden."""
    from accelerate import Accelerator

    from .checkpoint import build_from_meta, load_overrides
    from .engine import evaluate
    from .data_loaders import image_loader, image_transforms, load_data

    accelerator = Accelerator()
    ds, info = load_data(val_data_args(data_args, lt_info_path), accelerator)
    require(list(info.class_names) == [meta["id2label"][str(i)] for i in range(meta["num_labels"])],
            f"the val data ({info.dataset}) has other classes than the ingredients; pass their --dataset")
    require(len(ds["val"]) > 0, f"the val split of {info.dataset} is empty; greedy soups need one (--val_per_class)")
    model = build_from_meta(meta)
    loader = accelerator.prepare(image_loader(ds["val"], image_transforms(model.spec)[1], batch_size, num_workers))
    model.to(accelerator.device)

    def scorer(tensors):
        load_overrides(model, tensors, "the candidate soup")  # every candidate sets the same keys
        return evaluate(model, loader, accelerator, info.groups, info.num_classes, desc="val")

    return scorer


def val_data_args(data_args, lt_info_path):
    """Data flags for the val split: the user's when --dataset is given, else the split recorded in lt_info.json."""
    import argparse

    args = argparse.Namespace(**vars(data_args))
    if args.dataset is not None:
        return args
    require(Path(lt_info_path).is_file(), f"{lt_info_path} is missing; pass --dataset (and its flags) for the val split")
    info = read_json(lt_info_path, "split record")
    for flag, value in (recorded_flags(info) if isinstance(info, dict) else {}).items():
        setattr(args, flag, value)
    return args


# ----------------------------------------------------------------------------------------------------- output
def sha256_file(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weight_file_hashes(ing):
    names = (WEIGHTS_FILE, ADAPTER_WEIGHTS, ADAPTER_CONFIG, HEAD_INIT_FILE)
    return {name: sha256_file(ing.path / name) for name in names if (ing.path / name).is_file()}


def check_output_dir(output_dir, ingredients, overwrite, data_inputs=None):
    output_dir = Path(output_dir)
    check_writable_dir(output_dir, "--output_dir")
    check_outputs_apart({"--output_dir": output_dir},
                        {**{f"ingredient {i + 1}": ing.path for i, ing in enumerate(ingredients)}, **(data_inputs or {})})
    require(overwrite or not output_dir.exists(), f"{output_dir} already exists; choose another --output_dir or pass --overwrite")


def soup_meta(first, output_dir, soup_info):
    meta = {k: v for k, v in first.meta.items() if k != "format"}
    meta.update(method="soup", has_weights_file=True, run_name=Path(output_dir).name, soup=soup_info,
                arch={**first.meta["arch"], "lora": None},  # LoRA deltas are merged into plain weights
                dataset={**first.meta["dataset"], "balance_factor": None})
    return meta


def write_soup(output_dir, first, tensors, soup_info, manifest, metrics=None, hub_files=True):
    """An export dir like train_lt.py's (loadable by load_export) plus soup_manifest.json; returns the weights' sha256."""
    from .hub import model_card

    meta = soup_meta(first, output_dir, soup_info)
    head_init = read_tensors(first.path / HEAD_INIT_FILE)

    def write_extras(tmp):
        for name in COPIED_FILES:
            if (first.path / name).is_file():
                shutil.copyfile(first.path / name, tmp / name)
        (tmp / "README.md").write_text(model_card(meta, metrics or {}))
        if metrics:
            atomic_write_json(tmp / "metrics.json", metrics)
        atomic_write_json(tmp / MANIFEST_FILE, {**manifest, "output_sha256": sha256_file(tmp / WEIGHTS_FILE)})

    write_export(output_dir, meta, tensors, head_init, extra_writers=[write_extras], hub_files=hub_files)
    return json.loads((Path(output_dir) / MANIFEST_FILE).read_text())["output_sha256"]


# ------------------------------------------------------------------------------------------------------- soup
def make_soup(inputs, output_dir, mode="uniform", lam=0.7, weights=None, normalize=False, alpha=1.0,
              overwrite=False, scorer_factory=None, select_metric="mean_class_acc", progress=True, data_inputs=None,
              hub_files=True, merge_method="average", merge_flags=None):
    """Read, check, weigh and merge `inputs` (export dirs / Hub ids) into the export dir `output_dir`.

    scorer_factory(first ingredient) -> scorer(tensors) -> val metrics; needed by greedy only.
    merge_method: how tensors combine (lt_utils.merge); merge_flags: its flags by name (None = its default).
    Returns the manifest (as written to soup_manifest.json, plus "output_sha256" on the main process).
    """
    if mode == "greedy":
        check_select_metric(select_metric)
    from accelerate import PartialState
    require(mode in MODES, f"unknown soup mode {mode!r}; use one of {', '.join(MODES)}")
    require(weights is None or mode == "weighted", f"--weights sets the weights itself; drop --mode {mode}")
    params = _merge_params(merge_method, merge_flags or {})
    check_merge_weights(merge_method, weights or [])  # the only weights that can be negative; before any reading
    ingredients = [read_ingredient(p) for p in inputs]
    check_output_dir(output_dir, ingredients, overwrite, data_inputs)
    check_compatible(ingredients)
    check_anchor_defined(ingredients, [0.0], merge_method)
    first = ingredients[0]
    head_init = read_tensors(first.path / HEAD_INIT_FILE)
    base_state = load_base_state(first.meta) if needs_base(ingredients, [0.0], merge_method) else None
    scores, greedy, scorer = [None] * len(ingredients), None, None
    if mode == "greedy":
        require(scorer_factory is not None, "greedy soups need val data to score candidates")
        scorer = scorer_factory(first)
        kept, scores, steps = run_greedy(ingredients, scorer, select_metric, base_state, head_init, merge_method, params)
        mix = [0.0] + [1.0 / len(kept) if i in kept else 0.0 for i in range(len(ingredients))]
        greedy = {"metric": select_metric, "ranking_scores": scores, "steps": steps}
    else:
        mix = soup_weights(mode, len(ingredients), lam, weights, normalize)
    mix = with_alpha(mix, alpha)
    check_anchor_defined(ingredients, mix, merge_method)
    if base_state is None and needs_base(ingredients, mix, merge_method):
        base_state = load_base_state(first.meta)
    used = [i for i, w in enumerate(mix[1:]) if w != 0] or [0]  # zero-weight ingredients are not read
    tensors = merge_tensors([ingredients[i] for i in used], [mix[0]] + [mix[1 + i] for i in used],
                            base_state, head_init, progress=progress, merge_method=merge_method, params=params,
                            ids=used)
    del base_state
    metrics = {"val": scorer(tensors)} if scorer else None  # the final soup's full val metrics, for the model card
    soup_info = {"mode": mode, "lam": lam if mode == "progressive" else None, "alpha": alpha,
                 "anchor_weight": mix[0], "ingredients": [ing.name for ing in ingredients], "weights": mix[1:],
                 "merge": {"method": merge_method, **params}}
    manifest = {**soup_info, "normalize": bool(normalize), "greedy": greedy,
                "inputs": [{"path": ing.name, "weight": mix[1 + i], "val_score": scores[i], "sha256": weight_file_hashes(ing)}
                           for i, ing in enumerate(ingredients)]}
    state = PartialState()
    if state.is_main_process:
        manifest["output_sha256"] = write_soup(output_dir, first, tensors, soup_info, manifest, metrics, hub_files)
    state.wait_for_everyone()
    return manifest
