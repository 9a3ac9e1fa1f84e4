"""soup.py --merge_method: task arithmetic, TIES and DARE on real exports (full fine-tuning and LoRA) against hand
computations and peft's merge_utils; the default average bitwise as before; flag refusals; BatchNorm statistics.

Every export holds its whole model (a LoRA run's factors merged into the weights), so an ingredient's tensors are
its model.safetensors (read in LTModel key names by `export_tensors`) and its task vector is those minus the
zero-shot anchor: the base model's weights (`load_base_state` of its config) + head_init.safetensors."""
import hashlib
import json
import math
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from peft.utils import merge_utils
from safetensors.torch import load_file

import soup
from lt_utils.checkpoint import load_export, read_export_config
from lt_utils.errors import UserError
from lt_utils.heads import random_head_init
from lt_utils.merge import MERGE_METHODS, KeyInputs, merge_method
from lt_utils.models import build_lt_model
from lt_utils.soup import load_base_state, make_soup, read_ingredient, run_greedy
from tests.helpers_soup import write_adaptformer_ingredients, perturbed, tiny_lt_model, write_ingredient, write_lora_ingredient
from tests.helpers_cli import run_cli
from tests.helpers_train import export_config, export_tensors

REPO = Path(__file__).resolve().parents[1]
RESNET8 = REPO / "configs" / "models" / "cifar_resnet8"
C = 4
TOL = 1e-6  # the soups are float32; the hand and peft merges float64
LORA_SCALING = 2.0 / 4  # write_lora_ingredient's lora_alpha / r
NEW_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")


def zero_shot_anchor(export_dir):
    """The model an export was fine-tuned from, as soups take it: the base model's weights (`load_base_state` of its
    config) with the head init of head_init.safetensors (and a zero bias where the head has one)."""
    anchor = dict(load_base_state(read_export_config(export_dir)))
    anchor["head.weight"] = load_file(str(Path(export_dir) / "head_init.safetensors"))["weight"]
    if "head.bias" in anchor:
        anchor["head.bias"] = torch.zeros_like(anchor["head.bias"])
    return anchor


@pytest.fixture(scope="module")
def exports(vit_dir, tmp_path_factory):
    """Three full fine-tuning exports and two LoRA exports of the tiny ViT, all from one zero-shot model (the
    pretrained weights + a head init), and that zero-shot model's tensors (the anchor) as each kind's exports name
    it."""
    root = tmp_path_factory.mktemp("merge")
    lt = tiny_lt_model(vit_dir, C)
    head_init = random_head_init(C, lt.spec.hidden_size, seed=7)
    start = {**{k: v.clone() for k, v in lt.state_dict().items()}, "head.weight": head_init}
    full = [write_ingredient(root / f"full{i}", lt, vit_dir, perturbed(start, start.keys(), seed=200 + i), head_init)
            for i in range(3)]
    lora = [write_lora_ingredient(root / f"lora{s}", vit_dir, head_init, seed=s) for s in (1, 2)]
    anchors = {"full": zero_shot_anchor(full[0]), "lora": zero_shot_anchor(lora[0])}
    for anchor in anchors.values():  # both kinds start from the model the full runs were perturbed from
        assert set(anchor) == set(start) and all(torch.equal(anchor[k], v) for k, v in start.items())
    return {"full": full, "lora": lora, "anchor": anchors["full"], "anchors": anchors, "lt": lt, "vit": vit_dir,
            "head_init": head_init}


def _ingredient_tensors(exports, kind):
    """Each ingredient's tensors, LTModel keys: for LoRA its merged weights (what the soup reads), not its factors."""
    return [export_tensors(p) for p in exports[kind]]


def _task_vectors(tensors, anchor, key):
    return [t[key].double() - anchor[key].double() for t in tensors]


def _soup(exports, kind, tmp_path, name, *flags):
    out = tmp_path / name
    soup.main([*map(str, exports[kind]), "--output_dir", str(out), *flags])
    return out


def _check(got, want, what, diffs, key=""):
    diff = float((got.double() - want.double()).abs().max())
    diffs[what] = max(diff, diffs.get(what, 0.0))
    assert diff <= TOL, (what, key, diff)


def test_lora_task_vectors_are_the_adapters_deltas(exports):
    """A LoRA ingredient's task vector (merged weights - anchor) is scaling * B @ A on the adapter's targets (to the
    float32 rounding of the merged weights), its head's training on the head and 0 everywhere else."""
    anchor = exports["anchors"]["lora"]
    for path in exports["lora"]:
        tensors = export_tensors(path)
        adapter = load_file(str(path / "adapter" / "adapter_model.safetensors"))
        targets = {}
        for key, a in adapter.items():
            if ".lora_A." in key:
                name = "backbone." + key.removeprefix("base_model.model.").split(".lora_A.")[0] + ".weight"
                b = adapter[key.replace(".lora_A.", ".lora_B.")]
                targets[name] = LORA_SCALING * (b.double() @ a.double())
        assert targets and set(targets) <= set(tensors)
        for key, value in tensors.items():
            tau = value.double() - anchor[key].double()
            if key in targets:
                assert float((tau - targets[key]).abs().max()) <= TOL and float(targets[key].abs().max()) > 1e-2, key
            elif key.startswith("head."):
                assert float(tau.abs().max()) > 1e-2, key  # the trained head
            else:
                assert not tau.any(), key


# -------------------------------------------------------------------------------------------- hand computations
def _trim_by_hand(tau, density):
    """Keep the int(density * numel) entries of largest magnitude (a full sort, not topk), the rest 0."""
    k = int(density * tau.numel())
    keep = torch.zeros(tau.numel(), dtype=torch.bool)
    keep[tau.abs().flatten().argsort(descending=True)[:k]] = True
    return torch.where(keep.view(tau.shape), tau, torch.zeros_like(tau))


def _drop_seed_by_hand(merge_seed, ingredient_id, key):
    """A drop mask's seed: blake2b of "seed/ingredient position/key", 8 bytes little-endian."""
    digest = hashlib.blake2b(f"{merge_seed}/{ingredient_id}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _drop_mask_by_hand(merge_seed, ingredient_id, key, like, density):
    generator = torch.Generator().manual_seed(_drop_seed_by_hand(merge_seed, ingredient_id, key))
    return torch.bernoulli(torch.full_like(like, density), generator=generator)


def _disjoint_mean_by_hand(taus, weights, sign_method):
    """Elected sign per entry (sum of the values, or count of signs; 0 counts as +), then the weighted mean of the
    entries that have it, times the total weight."""
    stacked = torch.stack(taus)
    votes = stacked.sum(0) if sign_method == "total" else stacked.sign().sum(0)
    elected = torch.ones_like(votes)
    elected[votes < 0] = -1
    num = torch.zeros_like(votes)
    den = torch.zeros_like(votes)
    for w, tau in zip(weights, taus):
        agrees = (tau.sign() == elected).double()
        num += w * agrees * tau
        den += w * agrees
    mean = torch.zeros_like(votes)
    mean[den > 0] = num[den > 0] / den[den > 0]
    return mean * sum(weights)


def _by_hand(method, taus, weights, key, density=None, sign_method="total", merge_seed=0, scaling=1.0, ids=None):
    """The merged task vector of one key, written out."""
    ids = list(range(len(taus))) if ids is None else ids
    if method.startswith("dare"):
        taus = [tau * _drop_mask_by_hand(merge_seed, i, key, tau, density) / density for i, tau in zip(ids, taus)]
    if method == "ties":
        taus = [_trim_by_hand(tau, density) for tau in taus]
    if method in ("ties", "dare_ties"):
        return scaling * _disjoint_mean_by_hand(taus, weights, sign_method)
    return scaling * sum(w * tau for w, tau in zip(weights, taus))


def _by_peft(method, taus, weights, key, monkeypatch, density=None, sign_method="total", merge_seed=0):
    """peft's merge_utils on the same task vectors; its DARE draws (torch.bernoulli on the global generator, one call
    per task vector) are fed the same per-(ingredient, key) streams."""
    w = torch.tensor(weights, dtype=torch.float64)
    if method == "task_arithmetic":
        return merge_utils.task_arithmetic(taus, w)
    if method == "ties":
        return merge_utils.ties(taus, w, density, sign_method)
    real, ingredient = torch.bernoulli, iter(range(len(taus)))

    def seeded_bernoulli(probs):
        seed = _drop_seed_by_hand(merge_seed, next(ingredient), key)
        return real(probs, generator=torch.Generator().manual_seed(seed))

    with monkeypatch.context() as patch:
        patch.setattr(torch, "bernoulli", seeded_bernoulli)
        if method == "dare_linear":
            return merge_utils.dare_linear(taus, w, density)
        return merge_utils.dare_ties(taus, w, density, sign_method)


# ---------------------------------------------------------------------------------- new methods: hand and peft
CASES = {  # method: (flags, their values as the hand and peft merges take them)
    "task_arithmetic": (["--scaling", "1.5"], {"scaling": 1.5}),
    "ties": (["--density", "0.3", "--scaling", "0.8"], {"density": 0.3, "scaling": 0.8}),
    "dare_linear": (["--density", "0.5", "--merge_seed", "3"], {"density": 0.5, "merge_seed": 3}),
    "dare_ties": (["--density", "0.5", "--merge_seed", "3", "--majority_sign_method", "frequency"],
                  {"density": 0.5, "merge_seed": 3, "sign_method": "frequency"}),
}


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("method", NEW_METHODS)
def test_new_methods_match_hand_computation_and_peft(exports, tmp_path, monkeypatch, method, kind):
    flags, params = CASES[method][0], dict(CASES[method][1])
    out = _soup(exports, kind, tmp_path, method, "--merge_method", method, *flags)
    merged, anchor = export_tensors(out), exports["anchors"][kind]
    tensors = _ingredient_tensors(exports, kind)
    n = len(tensors)
    assert set(merged) == set(tensors[0])
    scaling = params.pop("scaling", 1.0)
    # peft's ties / dare_ties take the plain disjoint mean (weights 1); a uniform soup's weights 1/n give the same
    peft_weights = [1.0] * n if method in ("ties", "dare_ties") else [1.0 / n] * n
    diffs, moved = {}, 0.0
    for key, got in merged.items():
        taus = _task_vectors(tensors, anchor, key)
        base = anchor[key].double()
        _check(got, base + _by_hand(method, taus, [1.0 / n] * n, key, scaling=scaling, **params), "hand", diffs, key)
        peft = _by_peft(method, taus, peft_weights, key, monkeypatch, **params)
        _check(got, base + scaling * peft, "peft", diffs)
        moved = max(moved, float((got.double() - (base + sum(taus) / n)).abs().max()))
    assert moved > 1e-3, "the merge is the plain average: the test would not tell the methods apart"
    print(f"{method} {kind}: max |soup - hand| {diffs['hand']:.2e}, max |soup - peft| {diffs['peft']:.2e}")
    recorded = {"method": method, "scaling": scaling,
                **{("majority_sign_method" if k == "sign_method" else k): v for k, v in params.items()}}
    manifest = json.loads((out / "soup_manifest.json").read_text())
    for source in (manifest["merge"], export_config(out)["soup"]["merge"]):
        assert {k: source[k] for k in recorded} == recorded and source["method"] == method
    assert set(manifest["merge"]) == {"method", *MERGE_METHODS.get(method).defaults}  # the defaults recorded too


@pytest.mark.parametrize("method", NEW_METHODS)
def test_methods_in_float64_agree_with_peft_to_rounding(exports, monkeypatch, method):
    """The methods themselves (before the soup's float32 cast) on the real exports' tensors, against peft."""
    params = {"density": 0.3, "majority_sign_method": "frequency", "merge_seed": 5, "scaling": 1.0}
    method_entry = MERGE_METHODS.get(method)
    tensors, anchor, worst = _ingredient_tensors(exports, "full"), exports["anchor"], 0.0
    for key in tensors[0]:
        inputs = KeyInputs(key, [t[key] for t in tensors], [1 / 3] * 3, 0.0, anchor[key])
        got = method_entry.merge(inputs, **{k: v for k, v in params.items() if k in method_entry.defaults})
        peft_weights = [1.0] * 3 if method_entry.elects_sign else [1 / 3] * 3
        peft = _by_peft(method, _task_vectors(tensors, anchor, key), peft_weights, key, monkeypatch, density=0.3,
                        sign_method="frequency", merge_seed=5)
        assert got.dtype == torch.float64
        worst = max(worst, float((got - (anchor[key].double() + peft)).abs().max()))
    print(f"{method} float64: max |method - peft| {worst:.2e}")
    assert worst <= 1e-12, worst


@pytest.mark.parametrize("flags, method, sign_method", [
    (["--mode", "weighted", "--weights", "0.2", "0.3", "0.5", "--majority_sign_method", "frequency"], "ties", "frequency"),
    (["--mode", "progressive", "--lam", "0.7", "--alpha", "0.5", "--density", "0.4"], "dare_ties", "total"),
    (["--mode", "progressive", "--lam", "0.7", "--alpha", "0.5", "--scaling", "0.7"], "task_arithmetic", "total"),
])
def test_weights_and_alpha_carry_into_the_task_vector_methods(exports, tmp_path, flags, method, sign_method):
    """Weighted disjoint mean, times the total weight (so --alpha still moves toward the zero-shot model)."""
    out = _soup(exports, "full", tmp_path, method, "--merge_method", method, *flags)
    if "progressive" in flags:
        weights = [0.5 * 0.7 * 0.3 ** (2 - k) for k in range(3)]  # alpha * lam * (1 - lam)^(n - k)
    else:
        weights = [0.2, 0.3, 0.5]
    manifest = json.loads((out / "soup_manifest.json").read_text())
    assert manifest["weights"] == pytest.approx(weights, abs=1e-12)
    params = {k: v for k, v in manifest["merge"].items() if k != "method"}
    hand = {"density": params.get("density"), "sign_method": sign_method, "merge_seed": params.get("merge_seed", 0),
            "scaling": params["scaling"]}
    tensors, anchor, diffs = _ingredient_tensors(exports, "full"), exports["anchor"], {}
    for key, got in export_tensors(out).items():
        want = anchor[key].double() + _by_hand(method, _task_vectors(tensors, anchor, key), weights, key, **hand)
        _check(got, want, "hand", diffs)
    print(f"{method} {flags[1]}: max |soup - hand| {diffs['hand']:.2e}")


def test_dare_masks_depend_on_seed_ingredient_and_key_only(exports, tmp_path):
    a = _soup(exports, "full", tmp_path, "a", "--merge_method", "dare_linear", "--density", "0.3")
    again = _soup(exports, "full", tmp_path, "again", "--merge_method", "dare_linear", "--density", "0.3")
    other = _soup(exports, "full", tmp_path, "other", "--merge_method", "dare_linear", "--density", "0.3",
                  "--merge_seed", "1")
    sha = [json.loads((d / "soup_manifest.json").read_text())["output_sha256"] for d in (a, again, other)]
    assert sha[0] == sha[1] != sha[2]
    # a zero-weight first ingredient is not read, and the others keep their masks: ids are positions in the list
    skip = _soup(exports, "full", tmp_path, "skip", "--merge_method", "dare_linear", "--density", "0.3",
                 "--weights", "0", "0.5", "0.5")
    tensors, anchor, diffs = _ingredient_tensors(exports, "full"), exports["anchor"], {}
    kept = total = 0
    for key, got in export_tensors(skip).items():
        taus = _task_vectors(tensors[1:], anchor, key)
        _check(got, anchor[key].double() + _by_hand("dare_linear", taus, [0.5, 0.5], key, density=0.3, ids=[1, 2]),
               "hand", diffs)
        mask = _drop_mask_by_hand(0, 1, key, taus[0], 0.3)
        kept, total = kept + int(mask.sum()), total + mask.numel()
    assert abs(kept / total - 0.3) < 0.01, kept / total  # about density of the entries kept
    # greedy: a candidate soup drops the same entries of an ingredient as the final soup
    ingredients = [read_ingredient(p) for p in exports["full"]]
    base_state = load_base_state(ingredients[0].config)
    candidates = []

    def scorer(tensors):
        candidates.append(tensors)
        return {"mean_class_acc": -len(candidates)}  # the first alone is best: every later candidate is dropped

    params = {"density": 0.3, "merge_seed": 0, "scaling": 1.0}
    kept_ids, _, _ = run_greedy(ingredients, scorer, "mean_class_acc", base_state, {"weight": exports["head_init"]},
                                "dare_linear", params)
    assert kept_ids == [0]
    alone = candidates[1]  # ingredient 1 scored alone (no stored val score)
    for key, got in alone.items():
        want = anchor[key].double() + _by_hand("dare_linear", _task_vectors([tensors[1]], anchor, key), [1.0], key,
                                               density=0.3, ids=[1])
        _check(got, want, "greedy", diffs)


# ------------------------------------------------------------------------------------------- default: bitwise
def _exact_average(tensors, weights, anchor_weight, anchor, key):
    """merge_tensors' order of float64 operations: w_1 * T_1, + w_i * T_i, + w_0 * anchor (each a scaled copy)."""
    acc = tensors[0][key].to(torch.float64, copy=True).mul_(weights[0])
    for w, t in zip(weights[1:], tensors[1:]):
        if w:
            acc.add_(t[key].to(torch.float64, copy=True).mul_(w))
    if anchor_weight:
        acc.add_(anchor[key].to(torch.float64, copy=True).mul_(anchor_weight))
    return acc.float()


@pytest.mark.parametrize("kind, flags, anchor_weight, weights", [
    ("full", [], 0.0, [1 / 3] * 3),
    ("full", ["--merge_method", "average"], 0.0, [1 / 3] * 3),
    ("full", ["--weights", "0.2", "0.3", "0.5"], 0.0, [0.2, 0.3, 0.5]),
    ("full", ["--mode", "progressive", "--lam", "0.7"], 0.3 ** 3, [0.7 * 0.3 ** 2, 0.7 * 0.3, 0.7]),
    ("full", ["--alpha", "0.5"], 0.5, [0.5 / 3] * 3),
    ("lora", [], 0.0, [0.5, 0.5]),
    ("lora", ["--mode", "progressive", "--lam", "0.7"], 0.09, [0.21, 0.7]),
])
def test_default_average_is_bitwise_the_weighted_sum(exports, tmp_path, kind, flags, anchor_weight, weights):
    out = _soup(exports, kind, tmp_path, "avg", *flags)
    manifest = json.loads((out / "soup_manifest.json").read_text())
    assert manifest["merge"] == {"method": "average"}
    assert manifest["anchor_weight"] == pytest.approx(anchor_weight, abs=1e-12)
    assert manifest["weights"] == pytest.approx(weights, abs=1e-12)
    tensors, merged = _ingredient_tensors(exports, kind), export_tensors(out)
    assert set(merged) == set(tensors[0])
    for key, got in merged.items():  # the manifest's weights are the ones used; the order is the point
        want = _exact_average(tensors, manifest["weights"], manifest["anchor_weight"], exports["anchors"][kind], key)
        assert torch.equal(got, want), key
    if not flags:  # task arithmetic at scaling 1 is the same soup, up to rounding
        ta = export_tensors(_soup(exports, kind, tmp_path, "ta", "--merge_method", "task_arithmetic"))
        for key, got in merged.items():
            torch.testing.assert_close(ta[key], got, rtol=0, atol=TOL)


# ------------------------------------------------------------------------------------- BatchNorm and integers
def test_batchnorm_statistics_are_averaged_and_counters_kept(tmp_path):
    """A TIES soup of three real CIFAR ResNet-8 exports: BatchNorm running means and variances are averaged (bitwise
    the default soup's sum), each num_batches_tracked is the largest, every other tensor is TIES-merged."""
    lt = build_lt_model(RESNET8, C, head_type="linear", from_scratch=True, seed=0)
    state = lt.state_dict()
    h0 = random_head_init(C, state["head.weight"].shape[1], seed=7)
    floats = [k for k, v in state.items() if v.is_floating_point()]
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert counters and any(k.endswith("running_var") for k in floats)
    tensors = []
    for i in range(3):
        t = perturbed({**state, "head.weight": h0}, floats, seed=400 + i, scale=0.3)
        t.update({k: state[k].abs() + 0.5 + t[k].abs() for k in floats if k.endswith("running_var")})  # variances > 0
        t.update({k: torch.tensor(10 * (i + 1)) for k in counters})
        tensors.append(t)
    paths = [write_ingredient(tmp_path / f"bn{i}", lt, RESNET8, t, h0, head_type="linear", from_scratch=True, seed=0)
             for i, t in enumerate(tensors)]
    out = tmp_path / "soup"
    make_soup(paths, out, merge_method="ties", merge_flags={"density": 0.5}, progress=False)
    merged, anchor = export_tensors(out), zero_shot_anchor(paths[0])
    assert set(merged) == set(state)
    stats = [k for k in floats if k.endswith(("running_mean", "running_var"))]
    for key in stats:
        assert torch.equal(merged[key], _exact_average(tensors, [1 / 3] * 3, 0.0, None, key)), key
    for key in counters:
        assert merged[key].dtype == torch.int64 and int(merged[key]) == 30, key
    def ties_by_hand(key):
        return anchor[key].double() + _by_hand("ties", _task_vectors(tensors, anchor, key), [1 / 3] * 3, key, density=0.5)

    diffs = {}
    for key in set(floats) - set(stats):  # BN weights and biases, convolutions, the head (and its bias)
        _check(merged[key], ties_by_hand(key), "hand", diffs, key)
    # TIES on the statistics would be another soup: the check above tells them apart
    key = stats[0]
    assert float((ties_by_hand(key) - merged[key].double()).abs().max()) > 1e-3
    model, record = load_export(out)  # a loadable export: the merged statistics are the model's buffers
    assert record["soup"]["merge"]["method"] == "ties"
    assert torch.equal(model.state_dict()[key], merged[key])


# ------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("flags, message", [
    (["--density", "0.3"], "--density has no effect with --merge_method average; drop it or choose"),
    (["--merge_method", "task_arithmetic", "--density", "0.3"], "--density has no effect with --merge_method task_"),
    (["--merge_method", "ties", "--merge_seed", "1"], "--merge_seed has no effect with --merge_method ties"),
    (["--scaling", "2"], "--scaling has no effect with --merge_method average"),
    (["--merge_method", "ties", "--density", "0"], "--density 0 is out of range: must be in (0, 1]"),
    (["--merge_method", "ties", "--density", "1.5"], "is out of range"),
    (["--merge_method", "dare_linear", "--density", "nan"], "--density nan is not finite"),
    (["--merge_method", "task_arithmetic", "--scaling", "inf"], "--scaling inf is not finite"),
    (["--merge_method", "task_arithmetic", "--scaling", "-1"], "is out of range"),
    (["--merge_method", "dare_linear", "--merge_seed", "-1"], "is out of range"),
    (["--merge_method", "bogus"], "--merge_method bogus is not a valid choice; choose one of average"),
    (["--merge_method", "ties", "--majority_sign_method", "mean"], "is not a valid choice; choose one of total, frequency"),
    (["--merge_method", "ties", "--weights", "-0.5", "1.5"], "needs weights >= 0 (got -0.5)"),
])
def test_merge_flag_refusals_are_one_line(exports, tmp_path, capsys, flags, message):
    out = tmp_path / "refused"
    with pytest.raises(SystemExit) as exit_info:
        soup.main([*map(str, exports["full"][:2]), "--output_dir", str(out), *flags])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert message in err and "; " in err, err  # the problem, then the fix
    assert not out.exists()


def test_refusals_of_make_soup_callers(exports, tmp_path):
    a, b = exports["full"][:2]
    with pytest.raises(UserError, match=r"--density 2 is out of range: must be in \(0, 1\]"):  # the flag table checks callers too
        make_soup([a, b], tmp_path / "x", merge_method="ties", merge_flags={"density": 2}, progress=False)
    with pytest.raises(UserError, match="unknown --merge_method 'nope'"):
        make_soup([a, b], tmp_path / "x", merge_method="nope", progress=False)
    paths, up, keys = write_adaptformer_ingredients(tmp_path, exports["vit"], exports["head_init"], C)
    with pytest.raises(UserError, match="--merge_method ties merges task vectors .* AdaptFormer"):
        make_soup(paths, tmp_path / "af", merge_method="ties", progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "af").exists()


# ------------------------------------------------------------------------------------------------ extension
def test_a_registered_method_is_usable_from_the_cli_at_once(exports, tmp_path, capsys):
    @merge_method("test_halfway")
    def halfway(inputs, scaling=1.0):  # anchor + scaling / 2 * the first task vector
        anchor = inputs.anchor.double()
        return anchor + scaling / 2 * (inputs.tensors[0].double() - anchor)

    try:
        out = _soup(exports, "full", tmp_path, "halfway", "--merge_method", "test_halfway", "--scaling", "2")
        assert json.loads((out / "soup_manifest.json").read_text())["merge"] == {"method": "test_halfway", "scaling": 2.0}
        assert "merged by test_halfway (scaling 2.0)" in capsys.readouterr().out
        first = export_tensors(exports["full"][0])
        for key, got in export_tensors(out).items():
            assert torch.equal(got, first[key]), key
    finally:
        MERGE_METHODS.unregister("test_halfway")


# --------------------------------------------------------------------------------------------------- recipe
def test_lt_soups_script_passes_soup_args(exports, tmp_path):
    out = tmp_path / "lts"
    for b in range(2):
        write_ingredient(out / "stage1" / f"k0_branch{b}" / "final", exports["lt"], exports["vit"],
                         perturbed(exports["anchor"], exports["anchor"].keys(), seed=300 + b), exports["head_init"])
    # the script as its launchers see it (PYTHON=echo prints each command); each soup.py command then runs here,
    # in order (test_lt_soups_recipe runs the script itself, end to end)
    env = {**os.environ, "PYTHON": "echo", "OUT": str(out), "FACTORS": "0", "BRANCHES": "2",
           "BRANCH_SOUP_ARGS": "--merge_method task_arithmetic --scaling 1.2",
           "SOUP_ARGS": "--merge_method ties --density 0.5"}
    run = subprocess.run(["bash", "scripts/lt_soups.sh", "soup"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    commands = [shlex.split(line) for line in run.stdout.splitlines() if line.startswith("soup.py ")]
    assert len(commands) == 2
    for command in commands:
        assert run_cli("soup.py", *command[1:]).code == 0
    branch = json.loads((out / "soups" / "k0" / "soup_manifest.json").read_text())
    final = json.loads((out / "soup" / "soup_manifest.json").read_text())
    assert (branch["mode"], branch["merge"]) == ("uniform", {"method": "task_arithmetic", "scaling": 1.2})
    assert final["mode"] == "progressive"
    assert final["merge"] == {"method": "ties", "density": 0.5, "majority_sign_method": "total", "scaling": 1.0}
    assert math.isclose(final["weights"][0], 0.7)
