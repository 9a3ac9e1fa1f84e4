"""Model soups over export dirs: ingredients, compatibility checks, weights per mode, a streaming merge, the manifest.

Every soup is one weight vector over (anchor, ingredient_1 .. ingredient_N), summing to 1. The anchor is the
zero-shot model the ingredients were fine-tuned from: the base weights plus `head_init.safetensors`.

  uniform       anchor 0, 1/N each
  weighted      anchor 0, `--weights` as given (they must sum to 1, or pass `normalize`)
  progressive   LT-Soups' running merge in the given order: soup = (1-lam)*soup + lam*F_k, starting from the anchor;
                7 ingredients at lam 0.7 weigh 0.0002 (anchor), 0.0005, ..., 0.21, 0.70 (last)
  greedy        model-soups' greedy recipe: ranked by validation score, an ingredient joins only if the soup's
                validation score strictly improves; the kept ones are averaged uniformly
  alpha < 1     WiSE-FT on top of any mode: (1-alpha)*anchor + alpha*soup

The mode decides the weights; `merge_method` (lt_utils.merge) how the weighted tensors combine: averaged (default,
the soups above), or as task vectors from the anchor (task arithmetic, TIES, DARE).

Every export holds its whole model (LoRA merged into the weights), so any exports of one base, architecture, label
set and head init merge tensor by tensor; the soup is a plain export (no adapter). Only an anchor weight or task
vectors need the base model itself (its pretrained weights). Tensors are read one at a time with `safe_open` and
summed in float64, so peak memory is about the output plus, when the anchor needs it, the base model, whatever N
(ties and dare_ties also hold one key's tensor of every ingredient).
"""
import collections.abc
import copy
import dataclasses
import hashlib
import json
import math
from pathlib import Path

import torch

from .axes import MODES
from .checkpoint import (HEAD_INIT_FILE, check_finite, export_record, read_export_config, read_tensors,
                         recorded_inputs, resolve_export_dir, weight_files, weight_keys, write_export)
from .config import FLAGS, recorded_flags
from .errors import UserError, require
from .fileio import atomic_write_json, read_json
from .merge import MERGE_METHODS, KeyInputs, check_merge_weights, merge_params
from .metrics import check_select_metric, selection_score
from .modeling_lt import recorded_modules
from .paths import check_output, check_outputs_apart

MANIFEST_FILE = "soup_manifest.json"
# BatchNorm statistics are measured, not trained: a trimmed or dropped variance is no variance, so they are averaged
BN_STATS = ("running_mean", "running_var")


# ------------------------------------------------------------------------------------------------ ingredients
@dataclasses.dataclass
class Entry:
    """Where one LTModel tensor of an ingredient lives."""

    shape: tuple
    dtype: str  # safetensors dtype name ("F32", "BF16", "I64")
    file: str
    key: str  # key in `file`

    @property
    def is_float(self):
        return self.dtype.startswith(("F", "BF"))


@dataclasses.dataclass
class Ingredient:
    name: str  # as given by the user (a path or a Hub id)
    path: Path  # local export dir
    config: object  # its LTConfig
    entries: dict  # LTModel key -> Entry

    @property
    def meta(self):
        return export_record(self.config, self.path)


def read_ingredient(source):
    """An export dir (local or Hub id) and where each of its tensors lives; reads safetensors headers only."""
    path = resolve_export_dir(source)
    config = read_export_config(path)
    _check_soupable(config.method.get("name"), source)
    names, entries = weight_keys(config), {}
    for file in weight_files(path):
        for key, (shape, dtype) in _header(file).items():
            require(key in names, f"{file}: {key} is not a tensor of the model its config.json describes; re-export "
                                  f"{source}")
            entries[names[key]] = Entry(shape, dtype, file.name, key)
    read_tensors(path / HEAD_INIT_FILE)  # readable and finite: a soup's anchor and card come from it
    return Ingredient(str(source), path, config, entries)


def _check_soupable(method, source):
    """A method whose exports are not linear in their tensors cannot be averaged (a soup of soups can)."""
    from .peft_methods import METHODS

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


# ----------------------------------------------------------------------------------------------- compatibility
_SAME_FIELDS = (
    ("base model", lambda c: c.base_model),
    ("from_scratch", lambda c: bool(c.from_scratch)),
    ("backbone spec", lambda c: c.backbone_spec),
    # the added modules and where they sit (method, r, tuned blocks, prompt length, mask ratio and seed)
    ("adapters", lambda c: recorded_modules(c.method)),
    ("num_labels", lambda c: c.num_labels),
    ("id2label", lambda c: c.id2label),
    ("head type/scale", lambda c: (c.head_type, c.head_scale)),
    ("head init", lambda c: c.head_init.get("init_fingerprint")),
    # a from-scratch backbone is the seeded random init: another seed is another starting point
    ("from-scratch seed", lambda c: c.seed if c.from_scratch else None),
)


def val_data_record(meta):
    """What an export records of its validation split: the split's identity (its images' hash) and its local source."""
    info = meta["lt_info"]
    return {"dataset": info.dataset, "validation images": (info.index_hashes or {}).get("validation"),
            "data_dir": meta["dataset"].get("data_dir")}


def check_same_val_data(ingredients):
    """Greedy soups rank ingredients by their recorded validation scores and re-score candidates on one validation
    split: every ingredient must record that same split, or the scores compare different data."""
    first = val_data_record(ingredients[0].meta)
    for other in ingredients[1:]:
        theirs = val_data_record(other.meta)
        diff = next((k for k in first if first[k] != theirs[k]), None)
        if diff is not None:
            raise UserError(f"cannot rank {ingredients[0].name} and {other.name} greedily: they record other validation "
                            f"data ({diff} {_short(first[diff])} vs {_short(theirs[diff])}); soup runs trained on "
                            "the same split, or use --mode uniform")


def check_compatible(ingredients):
    """Refuse a set that cannot be averaged: other base, labels, head init, architecture, keys or shapes."""
    names = [ing.name for ing in ingredients]
    dup = next((n for n in names if names.count(n) > 1), None)
    require(dup is None, f"{dup} is listed twice; pass each ingredient once (use --weights to weigh one more)")
    first = ingredients[0]
    for other in ingredients[1:]:
        for field, get in _SAME_FIELDS:
            a, b = get(first.config), get(other.config)
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
    try:
        total = math.fsum(weights)
    except OverflowError:
        raise UserError("--weights sum beyond the float range; pass weights of ordinary size (--normalize "
                        "rescales them)") from None
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
def load_base_state(config):
    """The weights the ingredients started from: a from-scratch run's seeded init, rebuilt from the config alone, or
    the pretrained base model the record names (the one input of a soup that is not an export)."""
    from .models import build_lt_model
    from .modeling_lt import lt_model_from_config

    if config.from_scratch:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # as models.load_backbone seeds a from-scratch backbone
            return lt_model_from_config(config).state_dict()
    try:
        model = build_lt_model(config.base_model, config.num_labels, head_type=config.head_type,
                               head_scale=config.head_scale)
    except UserError as err:
        raise UserError(f"the zero-shot anchor (progressive soups, --alpha < 1) mixes in the base model's weights, but "
                        f"the base {config.base_model} cannot be loaded: {err}") from None
    return model.state_dict()


def needs_base(ingredients, weights, merge_method="average"):
    """A non-zero anchor or task vectors need the base for every non-head tensor."""
    anchored = weights[0] != 0 or MERGE_METHODS.get(merge_method).task_vectors
    return anchored and any(not k.startswith("head.") for k in ingredients[0].entries)


def check_anchor_defined(ingredients, weights, merge_method="average"):
    adapters = [k for k in ingredients[0].entries if k.startswith("adapters.")]
    require(not (adapters and MERGE_METHODS.get(merge_method).task_vectors),
            f"--merge_method {merge_method} merges task vectors from the zero-shot anchor, which AdaptFormer adapters "
            "lack (their init is not stored); use --merge_method average")
    require(weights[0] == 0 or not adapters,
            "progressive soups and --alpha need the zero-shot anchor, which AdaptFormer adapters lack (their init is "
            "not stored); use --mode uniform, weighted or greedy without --alpha")


def ingredient_tensor(ing, key):
    """One tensor of an ingredient, in LTModel key names."""
    from safetensors import safe_open

    entry = ing.entries[key]
    path = ing.path / entry.file
    try:
        with safe_open(str(path), framework="pt") as f:
            return _finite(f.get_tensor(entry.key), path, entry.key)
    except UserError:
        raise
    except Exception as err:  # bytes cut or changed after the header was read
        raise UserError(f"{path}: {entry.key} cannot be read ({err.__class__.__name__}); the file is truncated or "
                        "corrupted, re-export it") from None


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
        tensor = ingredient_tensor(first, key)
        if key.endswith("num_batches_tracked"):  # BatchNorm's step counter: the soup has seen the most steps of any
            out[key] = torch.stack([tensor] + [ingredient_tensor(ing, key) for ing, _ in rest]).max(dim=0).values
            continue
        if not first.entries[key].is_float:
            for ing, _ in rest:
                require(torch.equal(ingredient_tensor(ing, key), tensor),
                        f"{key} is an integer tensor that differs between {first.name} and {ing.name}; they cannot be souped")
            out[key] = tensor
            continue
        dtype = tensor.dtype
        chosen = average if key.endswith(BN_STATS) else method
        anchor = anchor_tensor(key, base_state, head_init) if weights[0] or chosen.task_vectors else None
        inputs = KeyInputs(key, _KeyTensors(ingredients, key, tensor), weights[1:], weights[0], anchor, ids)
        del tensor
        out[key] = chosen.merge(inputs, **((params or {}) if chosen is method else {})).to(dtype)
    return out


class _KeyTensors(collections.abc.Sequence):
    """One key's ingredient tensors, each read from its file when a merge method asks for it (the first is read)."""

    def __init__(self, ingredients, key, first):
        self._ingredients, self._key, self._first = ingredients, key, first

    def __len__(self):
        return len(self._ingredients)

    def __getitem__(self, i):
        if i == 0:
            return self._first
        return ingredient_tensor(self._ingredients[i], self._key)


def _merge_params(merge_method, merge_flags):
    """The method's parameters, each checked by the flag table as on the command line (callers of make_soup too)."""
    params = merge_params(merge_method, merge_flags)
    return {flag: FLAGS[flag].coerce(flag, value) if flag in FLAGS else value for flag, value in params.items()}


# ----------------------------------------------------------------------------------------------------- greedy
def stored_val_score(ing, metric):
    """The ingredient's validation score saved by train_lt.py (best/metrics.json), or None."""
    path = ing.path / "metrics.json"
    if not path.is_file():
        return None
    saved = read_json(path, "metrics")
    value = selection_score(saved.get("validation", {}) if isinstance(saved, dict) else {}, metric)
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
    """Rank by stored validation score (evaluating those without one), then greedy_select with real validation
    evaluations of the candidate soups, merged by `merge_method`."""
    def score_of(subset):
        tensors = merge_tensors([ingredients[i] for i in subset], [0.0] + [1.0 / len(subset)] * len(subset),
                                base_state, head_init, progress=False, merge_method=merge_method, params=params,
                                ids=subset)
        value = selection_score(scorer(tensors), metric)  # higher is better (NLLs negated)
        require(value is not None, f"the validation split gives no {metric}; choose another --select_metric")
        return float(value)

    scores = [stored_val_score(ing, metric) for ing in ingredients]
    scores = [s if s is not None else score_of([i]) for i, s in enumerate(scores)]
    order = sorted(range(len(ingredients)), key=lambda i: -scores[i])  # stable: ties keep the given order
    kept, steps = greedy_select(order, score_of)
    for step in steps:
        step["candidate"] = ingredients[step["candidate"]].name
    return kept, scores, steps


def build_val_scorer(first, data_args, batch_size=256, num_workers=0):
    """tensors -> validation metrics of the model they define; the validation split is the ingredients' own unless
    overridden."""
    from accelerate import Accelerator

    from .checkpoint import load_export
    from .engine import evaluate
    from .data_loaders import image_loader, image_transforms, load_data

    accelerator = Accelerator()
    model, meta = load_export(first.path)
    ds, info = load_data(val_data_args(data_args, meta), accelerator)
    require(list(info.class_names) == [meta["id2label"][str(i)] for i in range(meta["num_labels"])],
            f"the validation data ({info.dataset}) has other classes than the ingredients; pass their --dataset")
    require(len(ds["validation"]) > 0,
            f"the validation split of {info.dataset} is empty; greedy soups need one (--val_per_class)")
    loader = accelerator.prepare(image_loader(ds["validation"], image_transforms(model.spec)[1], batch_size, num_workers))
    model.to(accelerator.device)

    def scorer(tensors):
        model.load_state_dict(tensors)  # every candidate holds every tensor of the model (strict)
        return evaluate(model, loader, accelerator, info.groups, info.num_classes, desc="validation")

    return scorer


def val_data_args(data, meta):
    """The spec.DataSpec of the validation split: the user's when --dataset is given, else the split the first ingredient
    records (its LT split and the local source files it was trained on)."""
    if data.dataset is not None:
        return data
    recorded = recorded_flags(meta["lt_info"].to_dict())
    if meta["dataset"].get("data_dir"):
        recorded["data_dir"] = meta["dataset"]["data_dir"]
    return dataclasses.replace(data, **recorded)


# ----------------------------------------------------------------------------------------------------- output
def sha256_file(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weight_file_hashes(ing):
    files = [*weight_files(ing.path), ing.path / HEAD_INIT_FILE]
    return {f.name: sha256_file(f) for f in files}


def made_soup(output_dir, inputs, mode, lam=0.7, weights=None, normalize=False, alpha=1.0, merge_method="average",
              merge_flags=None):
    """The manifest of the soup in `output_dir` when it is the one these arguments make (the same ingredients, their
    weight files unchanged, the same recipe; a greedy soup's choice is its validation data's), else None: soup.py
    --push_to_hub then pushes that soup, evaluated since (eval_lt.py puts its numbers on its card), without merging."""
    path = Path(output_dir) / MANIFEST_FILE
    if not path.is_file():
        return None
    manifest = read_json(path, "soup manifest")
    ingredients = [read_ingredient(p) for p in inputs]
    recipe = {"mode": mode, "lam": lam if mode == "progressive" else None, "alpha": alpha, "normalize": bool(normalize),
              "merge": {"method": merge_method, **_merge_params(merge_method, merge_flags or {})},
              "ingredients": [ing.name for ing in ingredients]}
    if mode != "greedy":
        mix = with_alpha(soup_weights(mode, len(ingredients), lam, weights, normalize), alpha)
        recipe.update(anchor_weight=mix[0], weights=mix[1:])
    hashes = [i.get("sha256") for i in manifest.get("inputs", [])]
    same = all(manifest.get(key) == value for key, value in recipe.items())
    return manifest if same and hashes == [weight_file_hashes(i) for i in ingredients] else None


def check_output_dir(output_dir, ingredient_dirs, overwrite, data_inputs=None):
    output_dir = Path(output_dir)
    inputs = {}
    for i, path in enumerate(ingredient_dirs):
        inputs.update({f"ingredient {i + 1}": path, **recorded_inputs(path, f"ingredient {i + 1}")})
    check_outputs_apart({"--output_dir": output_dir}, {**inputs, **(data_inputs or {})})
    check_output(output_dir, "--output_dir")
    require(overwrite or not output_dir.exists(), f"{output_dir} already exists; choose another --output_dir or pass --overwrite")


def soup_config(first, output_dir, soup_info):
    """The first ingredient's config (same architecture, labels, split, head init by the checks) as a soup's."""
    config = copy.deepcopy(first.config)
    config.method, config.soup = {"name": "soup", "base": config.method}, soup_info
    config.run = {**config.run, "run_name": Path(output_dir).name, "balance_factor": None, "hub_model_id": None}
    return config


def write_soup(output_dir, first, tensors, soup_info, manifest, metrics=None):
    """An export dir like train_lt.py's (loadable by load_export) plus soup_manifest.json; returns the weights' sha256."""
    from .hub import model_card

    config = soup_config(first, output_dir, soup_info)
    head_init = read_tensors(first.path / HEAD_INIT_FILE)

    def write_extras(tmp):
        (tmp / "README.md").write_text(model_card(export_record(config), metrics or {}))
        if metrics:
            atomic_write_json(tmp / "metrics.json", metrics)
        digest = {f.name: sha256_file(f) for f in weight_files(tmp)}
        atomic_write_json(tmp / MANIFEST_FILE, {**manifest, "output_sha256": digest})

    write_export(output_dir, config, tensors, head_init, extra_writers=[write_extras])
    return json.loads((Path(output_dir) / MANIFEST_FILE).read_text())["output_sha256"]


# ------------------------------------------------------------------------------------------------------- soup
def make_soup(inputs, output_dir, mode="uniform", lam=0.7, weights=None, normalize=False, alpha=1.0,
              overwrite=False, scorer_factory=None, select_metric="mean_class_acc", progress=True, data_inputs=None,
              merge_method="average", merge_flags=None):
    """Read, check, weigh and merge `inputs` (export dirs / Hub ids) into the export dir `output_dir`.

    scorer_factory(first ingredient) -> scorer(tensors) -> validation metrics; needed by greedy only.
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
    check_output_dir(output_dir, [resolve_export_dir(p) for p in inputs], overwrite, data_inputs)  # before any reading
    ingredients = [read_ingredient(p) for p in inputs]
    check_compatible(ingredients)
    check_anchor_defined(ingredients, [0.0], merge_method)
    first = ingredients[0]
    head_init = read_tensors(first.path / HEAD_INIT_FILE)
    base_state = load_base_state(first.config) if needs_base(ingredients, [0.0], merge_method) else None
    scores, greedy, scorer = [None] * len(ingredients), None, None
    if mode == "greedy":
        require(scorer_factory is not None, "greedy soups need validation data to score candidates")
        check_same_val_data(ingredients)
        scorer = scorer_factory(first)
        kept, scores, steps = run_greedy(ingredients, scorer, select_metric, base_state, head_init, merge_method, params)
        mix = [0.0] + [1.0 / len(kept) if i in kept else 0.0 for i in range(len(ingredients))]
        greedy = {"metric": select_metric, "ranking_scores": scores, "steps": steps}
    else:
        mix = soup_weights(mode, len(ingredients), lam, weights, normalize)
    mix = with_alpha(mix, alpha)
    check_anchor_defined(ingredients, mix, merge_method)
    if base_state is None and needs_base(ingredients, mix, merge_method):
        base_state = load_base_state(first.config)
    used = [i for i, w in enumerate(mix[1:]) if w != 0] or [0]  # zero-weight ingredients are not read
    tensors = merge_tensors([ingredients[i] for i in used], [mix[0]] + [mix[1 + i] for i in used],
                            base_state, head_init, progress=progress, merge_method=merge_method, params=params,
                            ids=used)
    del base_state
    metrics = {"validation": scorer(tensors)} if scorer else None  # the final soup's full validation metrics (model card)
    soup_info = {"mode": mode, "lam": lam if mode == "progressive" else None, "alpha": alpha,
                 "anchor_weight": mix[0], "ingredients": [ing.name for ing in ingredients], "weights": mix[1:],
                 "merge": {"method": merge_method, **params}}
    manifest = {**soup_info, "normalize": bool(normalize), "greedy": greedy,
                "inputs": [{"path": ing.name, "weight": mix[1 + i], "validation_score": scores[i], "sha256": weight_file_hashes(ing)}
                           for i, ing in enumerate(ingredients)]}
    state = PartialState()
    if state.is_main_process:
        manifest["output_sha256"] = write_soup(output_dir, first, tensors, soup_info, manifest, metrics)
    state.wait_for_everyone()
    return manifest
