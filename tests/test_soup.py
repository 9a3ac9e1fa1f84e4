"""soup.py / lt_utils.soup: exact merges, weights per mode, LoRA exports, greedy, refusals, bounded memory."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import soup
from lt_utils.checkpoint import load_export, read_export_config, weight_keys
from lt_utils.data import load_lt_dataset
from lt_utils.errors import UserError
from lt_utils.heads import random_head_init
from lt_utils.runs import expand_ingredients
from lt_utils.soup import (Entry, Ingredient, greedy_select, make_soup, merge_tensors, sha256_file, soup_weights,
                           with_alpha)
from tests.helpers_models import make_tiny_vit
from tests.helpers_soup import (write_adaptformer_ingredients, perturbed, small_fashion_mnist, tiny_info, tiny_lt_model, write_ingredient,
                                write_lora_ingredient)

REPO = Path(__file__).resolve().parents[1]
C = 4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny pretrained ViT, its LTModel state, a head init and three full fine-tuning ingredients."""
    root = tmp_path_factory.mktemp("soup")
    vit = make_tiny_vit(root / "vit")
    lt = tiny_lt_model(vit, C)
    state = {k: v.clone() for k, v in lt.state_dict().items()}
    head_init = random_head_init(C, lt.spec.hidden_size, seed=7)
    ingredients = []
    for i in range(3):
        tensors = perturbed(state, state.keys(), seed=100 + i)
        ingredients.append(write_ingredient(root / f"full{i}", lt, vit, tensors, head_init))
    return {"root": root, "vit": vit, "lt": lt, "state": state, "head_init": head_init, "full": ingredients}


def _weights(path):
    """An export's tensors in LTModel key names, as its files hold them (read_ingredient's key map)."""
    names = weight_keys(read_export_config(path))
    return {names[k]: v for k, v in load_file(str(Path(path) / "model.safetensors")).items()}


# ------------------------------------------------------------------------------------------------ exact merges
def test_uniform_soup_equals_hand_average_exactly(base, tmp_path, capsys):
    out = tmp_path / "uniform"
    manifest = soup.main([*map(str, base["full"]), "--output_dir", str(out)])
    inputs = [_weights(p) for p in base["full"]]
    merged = _weights(out)
    assert set(merged) == set(inputs[0]) and len(merged) == len(base["state"])
    for key, value in merged.items():
        hand = sum(t[key].double() * (1 / 3) for t in inputs).float()  # sum of w_i * t_i in float64, then cast
        assert value.dtype == torch.float32 and torch.equal(value, hand), key
    # manifest: weights, inputs' hashes, output hash (also printed)
    saved = json.loads((out / "soup_manifest.json").read_text())
    assert saved["mode"] == "uniform" and saved["anchor_weight"] == 0.0
    assert saved["weights"] == pytest.approx([1 / 3] * 3)
    assert saved["inputs"][1]["sha256"]["model.safetensors"] == sha256_file(base["full"][1] / "model.safetensors")
    digest = sha256_file(out / "model.safetensors")
    assert saved["output_sha256"] == {"model.safetensors": digest} == manifest["output_sha256"]
    assert f"sha256 {digest}  model.safetensors" in capsys.readouterr().out
    # a normal export: loads, same head init, method "soup"
    model, meta = load_export(out)
    assert meta["method"] == "soup" and meta["soup"]["ingredients"] == [str(p) for p in base["full"]]
    assert torch.equal(model.state_dict()["head.weight"], merged["head.weight"])
    assert torch.equal(load_file(str(out / "head_init.safetensors"))["weight"], base["head_init"])
    assert (out / "README.md").is_file() and meta["train_counts"] == tiny_info(C).train_counts


def _file_ingredient(path, tensors):
    """An ingredient over a safetensors file of arbitrary tensors: merge_tensors' arithmetic alone."""
    path.mkdir()
    save_file(tensors, str(path / "t.safetensors"))
    entries = {k: Entry(tuple(v.shape), {torch.float16: "F16", torch.int64: "I64"}[v.dtype], "t.safetensors", k)
               for k, v in tensors.items()}
    return Ingredient(str(path), path, None, entries)


def test_integer_tensors_copied_and_low_precision_kept(tmp_path):
    halves = [torch.randn(6, 5, generator=torch.Generator().manual_seed(s)).half() for s in range(2)]
    ingredients = [_file_ingredient(tmp_path / f"i{s}", {"head.weight": halves[s], "backbone.ids": torch.arange(5)})
                   for s in range(2)]
    out = merge_tensors(ingredients, [0.0, 0.5, 0.5], progress=False)
    assert out["head.weight"].dtype == torch.float16
    assert torch.equal(out["head.weight"], ((halves[0].double() + halves[1].double()) / 2).half())
    assert torch.equal(out["backbone.ids"], torch.arange(5))
    bad = _file_ingredient(tmp_path / "bad", {"head.weight": halves[1], "backbone.ids": torch.arange(5) + 1})
    with pytest.raises(UserError, match="integer tensor that differs"):
        merge_tensors([ingredients[0], bad], [0.0, 0.5, 0.5], progress=False)


# --------------------------------------------------------------------------------------------------- weights
def test_progressive_weights_match_lt_soups_table():
    w = soup_weights("progressive", 7, lam=0.7)
    # LT-Soups' weights as printed there (rounded), anchor first: 0.3**7, then 0.7 * 0.3**k for k = 6 down to 0
    table = [0.0002, 0.0005, 0.0017, 0.0057, 0.019, 0.063, 0.21, 0.70]
    for got, want in zip(w, table):
        assert abs(got - want) <= 0.5 * 10 ** -(len(str(want)) - 2), (got, want)
    assert w[0] == pytest.approx(0.3 ** 7) and sum(w) == pytest.approx(1.0, abs=1e-12)
    assert soup_weights("progressive", 1, lam=0.7) == pytest.approx([0.3, 0.7])


def test_uniform_weighted_and_alpha_weights():
    assert soup_weights("uniform", 4) == [0.0, 0.25, 0.25, 0.25, 0.25]
    assert soup_weights("weighted", 2, weights=[0.25, 0.75]) == [0.0, 0.25, 0.75]
    assert soup_weights("weighted", 2, weights=[1, 3], normalize=True) == [0.0, 0.25, 0.75]
    with pytest.raises(UserError, match="sum to 4, not 1"):
        soup_weights("weighted", 2, weights=[1, 3])
    with pytest.raises(UserError, match="one value per ingredient"):
        soup_weights("weighted", 3, weights=[0.5, 0.5])
    assert with_alpha([0.0, 0.5, 0.5], 0.6) == pytest.approx([0.4, 0.3, 0.3])
    with pytest.raises(UserError, match="--alpha"):
        with_alpha([0.0, 1.0], 1.5)


def test_progressive_and_wiseft_tensors_include_the_zero_shot_anchor(base, tmp_path):
    f1, f2 = base["full"][:2]
    t1, t2 = _weights(f1), _weights(f2)
    anchor = dict(base["state"], **{"head.weight": base["head_init"]})  # pretrained weights + head init
    cases = {"progressive": (["--mode", "progressive", "--lam", "0.7"], (0.09, 0.21, 0.7)),
             "wiseft": (["--alpha", "0.5"], (0.5, 0.25, 0.25))}
    for name, (flags, (wa, w1, w2)) in cases.items():
        out = tmp_path / name
        soup.main([str(f1), str(f2), "--output_dir", str(out), *flags])
        merged = _weights(out)
        for key in merged:
            want = wa * anchor[key].double() + w1 * t1[key].double() + w2 * t2[key].double()
            torch.testing.assert_close(merged[key], want.float(), rtol=0, atol=1e-6)
        manifest = json.loads((out / "soup_manifest.json").read_text())
        assert manifest["anchor_weight"] == pytest.approx(wa) and manifest["weights"] == pytest.approx([w1, w2])


# ------------------------------------------------------------------------------------------------------ LoRA
def test_lora_exports_hold_the_exact_merge_and_soup_as_their_average(base, tmp_path):
    h0 = base["head_init"]
    paths = [write_lora_ingredient(tmp_path / f"lora{s}", base["vit"], h0, seed=s) for s in (1, 2)]
    weights = [_weights(p) for p in paths]
    # each export's weight is base + (B @ A) * lora_alpha / r, from its own plain peft adapter (scaling 2 / 4)
    adapters = [load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in paths]
    a_key = next(k for k in adapters[0] if k.endswith("q_proj.lora_A.weight"))
    b_key = a_key.replace("lora_A", "lora_B")
    target = "backbone." + a_key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
    for w, adapter in zip(weights, adapters):
        want = base["state"][target] + (adapter[b_key] @ adapter[a_key]) * 0.5
        assert torch.equal(w[target], want)
    out = tmp_path / "lora_soup"
    make_soup(paths, out, progress=False)
    soup_model, meta = load_export(out)
    assert meta["method"] == "soup" and not (out / "adapter").exists()  # a plain export: LoRA merged
    got = soup_model.state_dict()
    for key in got:
        assert torch.equal(got[key], ((weights[0][key].double() + weights[1][key].double()) / 2).float()), key
    # averaging A and B separately is not the same model: the check above would catch it
    mean_a = (adapters[0][a_key] + adapters[1][a_key]) / 2
    mean_b = (adapters[0][b_key] + adapters[1][b_key]) / 2
    naive = base["state"][target] + 0.5 * mean_b @ mean_a
    assert (naive - got[target]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------- greedy
def test_greedy_select_keeps_only_strict_improvements():
    # each candidate is a point; a soup is their mean; the score is minus its distance to the target (2, 0)
    points = {0: torch.tensor([1.0, 0.0]), 1: torch.tensor([3.0, 1.0]), 2: torch.tensor([-9.0, 9.0]),
              3: torch.tensor([2.0, 0.5]), 4: torch.tensor([2.0, -0.5])}
    target = torch.tensor([2.0, 0.0])

    def score(subset):
        return -float((torch.stack([points[i] for i in subset]).mean(0) - target).norm())

    kept, steps = greedy_select([0, 1, 2, 3, 4], score)
    # {0,1} -> (2, .5) improves; 2 worsens; 3 = the current mean -> equal, dropped; 4 -> (2, 1/3) improves
    assert kept == [0, 1, 4]
    assert [s["kept"] for s in steps] == [True, True, False, False, True]
    assert steps[3]["score"] == steps[1]["score"]


def test_greedy_soup_keeps_and_drops_on_real_val_data(base, tmp_path):
    data_dir = small_fashion_mnist(tmp_path / "fmnist", train_per_class=30, test_per_class=2)
    cache = tmp_path / "cache"
    ds, info = load_lt_dataset("fashion_mnist_lt", imb=3, data_dir=data_dir, max_per_class=15, val_per_class=10,
                               cache_dir=cache)
    vit = base["vit"]
    lt = tiny_lt_model(vit, 10)
    good = _class_means(lt, ds["train"], 10)  # cosine head: a row's length does not matter, its direction does
    broken = good.clone()
    broken[0] = good[1]  # class 0's row points at class 1
    long_row = good.clone()
    long_row[0] = 100 * good[0]  # alone the same classifier as `good`; averaged with `broken`, it repairs row 0
    shifted = good.roll(1, dims=0)  # every class gets its neighbour's row
    heads = {"broken": (broken, 95.0), "shifted": (shifted, 5.0), "long_row": (long_row, None)}  # None: evaluated
    paths = [write_ingredient(tmp_path / name, lt, vit, {"head.weight": head}, good, method="head", info=info,
                              metrics=None if score is None else {"validation": {"mean_class_acc": score}})
             for name, (head, score) in heads.items()]
    out = tmp_path / "greedy"
    soup.main([*map(str, paths), "--mode", "greedy", "--output_dir", str(out), "--data_dir", str(data_dir),
               "--cache_dir", str(cache)])
    manifest = json.loads((out / "soup_manifest.json").read_text())
    steps, ranking = manifest["greedy"]["steps"], manifest["greedy"]["ranking_scores"]
    assert ranking[:2] == [95.0, 5.0] and 5.0 < ranking[2] < 95.0  # stored scores; long_row's measured on val
    assert [s["candidate"] for s in steps] == [str(paths[i]) for i in (0, 2, 1)]  # best stored score first
    assert [s["kept"] for s in steps] == [True, True, False]
    assert steps[1]["score"] > steps[0]["score"] and steps[2]["score"] <= steps[1]["score"]
    assert manifest["weights"] == [0.5, 0.0, 0.5]
    assert torch.equal(_weights(out)["head.weight"], ((broken.double() + long_row.double()) / 2).float())
    assert json.loads((out / "metrics.json").read_text())["validation"]["mean_class_acc"] == pytest.approx(steps[1]["score"])


def _class_means(lt, train, num_classes):
    from lt_utils.data_loaders import image_loader, image_transforms
    from lt_utils.head_init import class_mean_head_init

    return class_mean_head_init(lt, image_loader(train, image_transforms(lt.spec)[1], 64, 0), num_classes)


# -------------------------------------------------------------------------------------------------- refusals
def _variant(tmp_path, base, name, tensors=None, head_init=None, info=None, **meta_kwargs):
    tensors = tensors if tensors is not None else {"head.weight": base["head_init"] * 2}
    return write_ingredient(tmp_path / name, base["lt"], meta_kwargs.pop("base_dir", base["vit"]), tensors,
                            base["head_init"] if head_init is None else head_init, info=info, **meta_kwargs)


@pytest.mark.parametrize("case, message", [
    ("base", "base model differ"), ("labels", "id2label differ"), ("head_init", "head init differ"),
    ("shape", "has shape"), ("keys", "tensors"), ("head_type", "head type/scale differ"),
])
def test_incompatible_ingredients_are_refused(base, tmp_path, case, message):
    first = _variant(tmp_path, base, "first")
    if case == "base":
        other_base = make_tiny_vit(tmp_path / "other_vit", seed=1)
        other = _variant(tmp_path, base, "other", base_dir=other_base)
    elif case == "labels":
        info = tiny_info(C)
        info.class_names = list(reversed(info.class_names))
        other = _variant(tmp_path, base, "other", info=info)
    elif case == "head_init":
        other = _variant(tmp_path, base, "other", head_init=base["head_init"].flip(0))
    elif case in ("shape", "keys"):  # weight files edited after export: the record no longer describes them
        other = _variant(tmp_path, base, "other")
        weights = load_file(str(other / "model.safetensors"))
        if case == "shape":
            weights["lt.head.weight"] = torch.zeros(C, 7)  # the head is the project's own module: saved as named
        else:
            weights["lt.backbone.extra"] = torch.ones(2)
        save_file(weights, str(other / "model.safetensors"))
    else:
        linear = tiny_lt_model(base["vit"], C, head_type="linear")
        other = write_ingredient(tmp_path / "other", linear, base["vit"], {"head.weight": base["head_init"] * 2},
                                 base["head_init"], head_type="linear")
    with pytest.raises(UserError, match=message):
        make_soup([first, other], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_output_and_argument_refusals(base, tmp_path, capsys):
    a, b = base["full"][:2]
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        soup.main([str(a), str(b), "--output_dir", str(existing)])
    assert exit_info.value.code == 2 and "already exists" in capsys.readouterr().err
    soup.main([str(a), str(b), "--output_dir", str(existing), "--overwrite"])
    assert (existing / "model.safetensors").is_file()
    with pytest.raises(UserError, match="is the input ingredient 1"):
        make_soup([a, b], a, overwrite=True, progress=False)
    with pytest.raises(UserError, match="listed twice"):
        make_soup([a, a], tmp_path / "dup", progress=False)
    with pytest.raises(UserError, match="drop --mode"):
        make_soup([a, b], tmp_path / "w", mode="progressive", weights=[0.5, 0.5], progress=False)
    with pytest.raises(UserError, match="not an export dir"):
        (tmp_path / "not_export").mkdir()
        make_soup([a, tmp_path / "not_export"], tmp_path / "x", progress=False)


def test_adaptformer_anchor_is_refused_but_uniform_works(base, tmp_path):
    paths, up, keys = write_adaptformer_ingredients(tmp_path, base["vit"], base["head_init"], C)
    with pytest.raises(UserError, match="AdaptFormer"):
        make_soup(paths, tmp_path / "prog", mode="progressive", progress=False)
    make_soup(paths, tmp_path / "uni", progress=False)
    assert torch.equal(_weights(tmp_path / "uni")[up], torch.full(keys[up].shape, 1.5))
    assert load_export(tmp_path / "uni")[1]["method_config"]["base"]["name"] == "adaptformer"
    # the soup is told apart from training runs by its recorded method, so a glob over both merges the runs only
    picked, notes = expand_ingredients([*map(str, paths), str(tmp_path / "uni")])
    assert picked == list(map(str, paths)) and notes == [f"skipping {tmp_path / 'uni'}: a soup, not a training run "
                                                         "(pass soups alone to merge soups)"]


# ---------------------------------------------------------------------------------------------------- memory
_PEAK_SCRIPT = textwrap.dedent("""
    import json, re, sys
    sys.path.insert(0, sys.argv[1])
    import lt_utils.peft_methods  # noqa: F401  (make_soup imports it on first use; imports do not count)
    from lt_utils.soup import make_soup
    # what the writing side imports (the data package brings `datasets`): imports are not the merge's memory
    import lt_utils.data, lt_utils.hub, lt_utils.hub_files, lt_utils.models, transformers.modeling_utils  # noqa

    def high_water_kib():
        return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read())[1])

    for out, paths in json.loads(sys.argv[2]):
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS: imports do not count
        before = high_water_kib()
        make_soup(paths, out, progress=False)
        print(json.dumps({"before": before, "peak": high_water_kib()}))
""")


@pytest.mark.slow  # a fresh interpreter (its peak RSS)
def test_peak_memory_does_not_grow_with_the_number_of_ingredients(base, tmp_path):
    """ViTs of about 20 MB: the peak RSS above the post-import level is flat from 2 to 6 ingredients."""
    vit = make_tiny_vit(tmp_path / "vit", hidden=256, layers=10, heads=4)
    lt = tiny_lt_model(vit, C)
    state = lt.state_dict()
    h0 = random_head_init(C, 256, seed=7)
    paths = [write_ingredient(tmp_path / f"big{i}", lt, vit, perturbed(state, state, seed=i), h0) for i in range(6)]
    # one interpreter, the peak reset before each soup. The first soup keeps ~47 MB it allocates once (measured:
    # the RSS after it stays that much higher), which would count against whichever soup came first: it warms up
    soups = [(str(tmp_path / f"out{i}_{n}"), [str(p) for p in paths[:n]]) for i, n in enumerate((2, 2, 6))]
    # glibc raises its mmap threshold after big frees and then keeps freed buffers in the heap, which adds allocator
    # noise that depends on timing; a fixed threshold returns every big buffer, so RSS shows the merge
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    run = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(REPO), json.dumps(soups)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    rss = [json.loads(line) for line in run.stdout.strip().splitlines()[-2:]]
    growth = {n: (r["peak"] - r["before"]) / 1024 for n, r in zip((2, 6), rss)}
    model_mb = (paths[0] / "model.safetensors").stat().st_size / 2**20
    assert model_mb > 16  # big enough that loading every ingredient would show
    assert growth[6] - growth[2] < model_mb, growth  # loading every ingredient would add 4 x 32 MB
    assert growth[6] < 4 * model_mb, growth  # the output, its serialised copy, a few per-tensor buffers
