"""soup.py --merge_method: task arithmetic, TIES and DARE on real exports (full fine-tuning and LoRA) against hand
computations and peft's merge_utils; the default average bitwise as before; flag refusals; BatchNorm statistics."""
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft.utils import merge_utils
from safetensors.torch import load_file

import soup
from lt_utils.checkpoint import read_export_meta
from lt_utils.errors import UserError
from lt_utils.heads import random_head_init
from lt_utils.merge import MERGE_METHODS, KeyInputs, merge_method
from lt_utils.soup import load_base_state, make_soup, merge_tensors, read_ingredient, run_greedy
from tests.helpers_soup import perturbed, tiny_lt_model, write_ingredient, write_lora_ingredient

REPO = Path(__file__).resolve().parents[1]
C = 4
TOL = 1e-6  # the soups are float32; the hand and peft merges float64
LORA_SCALING = 2.0 / 4  # write_lora_ingredient's lora_alpha / r
NEW_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")


@pytest.fixture(scope="module")
def exports(vit_dir, tmp_path_factory):
    """Three full fine-tuning exports and two LoRA exports of the tiny ViT, all from one zero-shot model (the
    pretrained weights + a head init), and that zero-shot model's tensors (the anchor)."""
    root = tmp_path_factory.mktemp("merge")
    lt = tiny_lt_model(vit_dir, C)
    head_init = random_head_init(C, lt.spec.hidden_size, seed=7)
    anchor = {**{k: v.clone() for k, v in lt.state_dict().items()}, "head.weight": head_init}
    full = [write_ingredient(root / f"full{i}", lt, vit_dir, perturbed(anchor, anchor.keys(), seed=200 + i), head_init)
            for i in range(3)]
    lora = [write_lora_ingredient(root / f"lora{s}", vit_dir, head_init, seed=s) for s in (1, 2)]
    return {"full": full, "lora": lora, "anchor": anchor, "lt": lt, "vit": vit_dir, "head_init": head_init}


def _weights(path):
    return load_file(str(Path(path) / "lt_weights.safetensors"))


def _lora_tensors(path, anchor):
    """A LoRA export in LTModel keys, by hand: its q/v targets base + scaling * B @ A (float64), its head as saved."""
    adapter = load_file(str(Path(path) / "lt_adapter" / "adapter_model.safetensors"))
    out = {}
    for key, value in adapter.items():
        name = key.removeprefix("base_model.model.")
        if ".lora_A." in name:
            target = name.split(".lora_A.")[0] + ".weight"
            b = adapter[key.replace(".lora_A.", ".lora_B.")]
            out[target] = anchor[target].double() + LORA_SCALING * (b.double() @ value.double())
        elif ".lora_B." not in name:
            out[name] = value
    return out


def _ingredient_tensors(exports, kind):
    if kind == "full":
        return [_weights(p) for p in exports["full"]]
    return [_lora_tensors(p, exports["anchor"]) for p in exports["lora"]]


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
    merged, anchor = _weights(out), exports["anchor"]
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
    for source in (manifest["merge"], read_export_meta(out)["soup"]["merge"]):
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
    for key, got in _weights(out).items():
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
    for key, got in _weights(skip).items():
        taus = _task_vectors(tensors[1:], anchor, key)
        _check(got, anchor[key].double() + _by_hand("dare_linear", taus, [0.5, 0.5], key, density=0.3, ids=[1, 2]),
               "hand", diffs)
        mask = _drop_mask_by_hand(0, 1, key, taus[0], 0.3)
        kept, total = kept + int(mask.sum()), total + mask.numel()
    assert abs(kept / total - 0.3) < 0.01, kept / total  # about density of the entries kept
    # greedy: a candidate soup drops the same entries of an ingredient as the final soup
    ingredients = [read_ingredient(p) for p in exports["full"]]
    base_state = load_base_state(ingredients[0].meta)
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
    tensors = _ingredient_tensors(exports, kind)
    for key, got in _weights(out).items():  # the manifest's weights are the ones used; the order is the point
        want = _exact_average(tensors, manifest["weights"], manifest["anchor_weight"], exports["anchor"], key)
        assert torch.equal(got, want), key
    if kind == "full" and not flags:  # task arithmetic at scaling 1 is the same soup, up to rounding
        ta = _weights(_soup(exports, kind, tmp_path, "ta", "--merge_method", "task_arithmetic"))
        for key, got in _weights(out).items():
            torch.testing.assert_close(ta[key], got, rtol=0, atol=TOL)


# ------------------------------------------------------------------------------------- BatchNorm and integers
def test_batchnorm_statistics_are_averaged_and_counters_kept(exports, tmp_path):
    g = torch.Generator().manual_seed(0)
    base_state = {"backbone.bn.weight": torch.randn(16, generator=g), "backbone.bn.running_mean": torch.randn(16, generator=g),
                  "backbone.bn.running_var": torch.rand(16, generator=g) + 0.5}
    h0 = exports["head_init"]
    tensors = [{**{k: v + 0.3 * torch.randn(16, generator=g) for k, v in base_state.items()},
                "head.weight": h0 + 0.1 * torch.randn(h0.shape, generator=g),
                "backbone.bn.num_batches_tracked": torch.tensor(10 * (i + 1))} for i in range(3)]
    paths = [write_ingredient(tmp_path / f"bn{i}", exports["lt"], exports["vit"], t, h0, hub_files=False)
             for i, t in enumerate(tensors)]
    ingredients = [read_ingredient(p) for p in paths]
    out = merge_tensors(ingredients, [0.0] + [1 / 3] * 3, base_state, {"weight": h0}, progress=False,
                        merge_method="ties", params={"density": 0.5, "majority_sign_method": "total", "scaling": 1.0})
    for key in ("backbone.bn.running_mean", "backbone.bn.running_var"):
        assert torch.equal(out[key], _exact_average(tensors, [1 / 3] * 3, 0.0, None, key)), key
    assert int(out["backbone.bn.num_batches_tracked"]) == 30
    anchor = {**base_state, "head.weight": h0}
    for key in ("backbone.bn.weight", "head.weight"):
        want = anchor[key].double() + _by_hand("ties", _task_vectors(tensors, anchor, key), [1 / 3] * 3, key, density=0.5)
        _check(out[key], want, "hand", {})


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
    keys = {"head.weight": exports["head_init"], "adapters.0.up.weight": torch.ones(32, 2)}
    arch = {"adapters": "adaptformer", "adapter_dim": 2, "lora": None}
    paths = [write_ingredient(tmp_path / f"af{i}", exports["lt"], exports["vit"], {k: v * (i + 1) for k, v in keys.items()},
                              exports["head_init"], method="adaptformer", arch=arch) for i in range(2)]
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
        first = _weights(exports["full"][0])
        for key, got in _weights(out).items():
            assert torch.equal(got, first[key]), key
    finally:
        MERGE_METHODS.unregister("test_halfway")


# --------------------------------------------------------------------------------------------------- recipe
def test_lt_soups_script_passes_soup_args(exports, tmp_path):
    out = tmp_path / "lts"
    for b in range(2):
        write_ingredient(out / "stage1" / f"k0_branch{b}" / "final", exports["lt"], exports["vit"],
                         perturbed(exports["anchor"], exports["anchor"].keys(), seed=300 + b), exports["head_init"])
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "FACTORS": "0", "BRANCHES": "2",
           "BRANCH_SOUP_ARGS": "--merge_method task_arithmetic --scaling 1.2",
           "SOUP_ARGS": "--merge_method ties --density 0.5", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(["bash", "scripts/lt_soups.sh", "soup"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    branch = json.loads((out / "soups" / "k0" / "soup_manifest.json").read_text())
    final = json.loads((out / "soup" / "soup_manifest.json").read_text())
    assert (branch["mode"], branch["merge"]) == ("uniform", {"method": "task_arithmetic", "scaling": 1.2})
    assert final["mode"] == "progressive"
    assert final["merge"] == {"method": "ties", "density": 0.5, "majority_sign_method": "total", "scaling": 1.0}
    assert math.isclose(final["weights"][0], 0.7)
