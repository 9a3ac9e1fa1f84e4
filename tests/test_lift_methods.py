"""LIFT's fine-tuning menu: trainable counts on CLIP ViT-B/16 equal LIFT's table (meta device), the modules' placement
and init, and every method trains, exports (every tensor, the untrained ones as the base has them), reloads through
load_export, evaluates identically and resumes exactly."""
import json
import math
import re
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers_models import random_pixels, vit_b16_clip_config, vit_b16_vit_config, write_config_only
from helpers_cli import run_cli
from helpers_train import REPO, assert_resumed_weights, export_tensors, run_main, tiny_train_args

sys.path.insert(0, str(REPO))
from lt_utils import peft_modules as PM  # noqa: E402
from lt_utils.checkpoint import load_export  # noqa: E402
from lt_utils.config import build_train_parser  # noqa: E402
from lt_utils.errors import UserError  # noqa: E402
from lt_utils.spec import MethodSpec, method_config_of  # noqa: E402
from lt_utils.models import build_lt_model  # noqa: E402
from lt_utils.peft_methods import (METHODS, apply_method, head_parameter_count,  # noqa: E402
                                   trainable_parameter_count, transformer_blocks)

# LIFT's code on CLIP ViT-B/16 with 100 classes: trainable parameters besides the head (issue 9's table)
LIFT_COUNTS = {"full": 85_054_464, "bitfit": 101_376, "ln": 36_864, "vpt_shallow": 7_680, "vpt_deep": 92_160,
               "adapter": 101_424, "mask": 84_996, "adaptformer": 101_436, "lora": 147_456, "ssf_attn": 73_728,
               "ssf_mlp": 92_160, "ssf_ln": 36_864,
               # not in LIFT's table: LIFT's lora_mlp crashes; 12 * (768*4 + 4*3072) * 2 is LoRA beside fc1 and fc2
               "lora_mlp": 368_640, "head": 0, "full_all": 85_799_424,
               # bitfit plus the pre/post LayerNorm biases (CLIP's patch embedding has no bias): 101,376 + 2 * 768
               "bitfit_all": 102_912}


def _meta_model(config_dir, num_classes=100):
    with torch.device("meta"):  # ViT-B/16 shapes without allocating weights
        return build_lt_model(config_dir, num_classes, from_scratch=True)


@pytest.fixture(scope="module")
def b16_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("b16")
    return {"clip": write_config_only(root / "clip", vit_b16_clip_config()),
            "vit": write_config_only(root / "vit", vit_b16_vit_config())}


def test_the_table_names_registered_methods():
    assert set(LIFT_COUNTS) <= set(METHODS.names())  # a method added later needs no entry here


@pytest.mark.parametrize("method", list(LIFT_COUNTS))
def test_trainable_counts_equal_lifts_on_clip_vit_b16(b16_dirs, method):
    model = apply_method(_meta_model(b16_dirs["clip"]), method)
    head = head_parameter_count(model)
    assert head == 76_800
    assert trainable_parameter_count(model) - head == LIFT_COUNTS[method]


@pytest.mark.parametrize("method,k,expected", [("adaptformer", 6, 50_718), ("bitfit", 6, 50_688), ("full", 1, 7_087_872),
                                               ("vpt_deep", 6, 46_080), ("vpt_shallow", 6, 7_680), ("lora", 6, 73_728),
                                               ("lora_mlp", 3, 92_160), ("ssf_ln", 6, 18_432)])
def test_partial_layers_tune_the_last_k_blocks(b16_dirs, method, k, expected):
    model = apply_method(_meta_model(b16_dirs["clip"]), method, partial_layers=k)
    assert trainable_parameter_count(model) - head_parameter_count(model) == expected
    trained_blocks = {int(n.split(".")[n.split(".").index("layers") + 1])
                      for n, p in model.named_parameters() if p.requires_grad and ".layers." in n}
    assert trained_blocks <= set(range(12 - k, 12))


def test_hf_vit_counts_equal_clips(b16_dirs):
    """HF ViT-B/16 has the same block shapes: the same counts (separate q, k, v projections as CLIP's)."""
    for method in ("full", "bitfit", "ln", "vpt_deep", "adapter", "ssf_attn", "ssf_mlp", "lora_mlp"):
        model = apply_method(_meta_model(b16_dirs["vit"]), method)
        assert trainable_parameter_count(model) - head_parameter_count(model) == LIFT_COUNTS[method], method


def test_partial_layers_and_method_flags_are_checked(clip_dir):
    with pytest.raises(UserError, match=r"--partial_layers 3: the backbone has 2 blocks; pass 1..2"):
        apply_method(build_lt_model(clip_dir, 3), "bitfit", partial_layers=3)
    with pytest.raises(UserError, match="--partial_layers applies to methods that tune blocks, not --method head"):
        apply_method(build_lt_model(clip_dir, 3), "head", partial_layers=1)
    with pytest.raises(UserError, match="already has adaptformer modules; --method vpt_deep"):
        apply_method(apply_method(build_lt_model(clip_dir, 3), "adaptformer"), "vpt_deep")


# ---- placement and init ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["adapter", "mask", "lora_mlp"])
def test_untrained_modules_leave_logits_unchanged(clip_dir, method):
    """Zero-initialised Up / LoRA B and masked copies of the frozen entries: exactly the base model at start."""
    x = random_pixels(2)
    with torch.no_grad():
        reference = build_lt_model(clip_dir, 3).eval()(x)
        torch.testing.assert_close(apply_method(build_lt_model(clip_dir, 3), method).eval()(x), reference, rtol=0, atol=0)


def test_ssf_is_scale_and_shift_after_each_placed_part(vit_dir):
    """SSF on the fused qkv = per-projection slices of one 3D scale/shift (LIFT's ssf_attn on in_proj)."""
    model = apply_method(build_lt_model(vit_dir, 3), "ssf_attn").eval()
    blocks, parts, _ = transformer_blocks(model)
    ssf = model.adapters[0]["attn_in"]
    assert ssf.scale.shape == (96,) and abs(ssf.scale.mean().item() - 1) < 0.01 and ssf.scale.std() > 0.005
    h = torch.randn(2, 5, 32)
    v = PM.block_part(blocks[0], parts, "v")
    with torch.no_grad():
        expected = torch.nn.functional.linear(h, v.weight, v.bias) * ssf.scale[64:] + ssf.shift[64:]
        torch.testing.assert_close(v(h), expected, rtol=0, atol=1e-6)


def test_vpt_appends_prompts_and_deep_replaces_them(clip_dir):
    x = random_pixels(2)
    seq = (32 // 8) ** 2 + 1
    for method in ("vpt_shallow", "vpt_deep"):
        model = apply_method(build_lt_model(clip_dir, 3), method).eval()
        with torch.no_grad():
            assert model.backbone(pixel_values=x).last_hidden_state.shape[1] == seq + 10
            assert (model(x) - build_lt_model(clip_dir, 3).eval()(x)).abs().max() > 1e-4
        # LIFT's init: U(+-sqrt(6 / (3 * 8 * 8 + 32)))
        bound = math.sqrt(6 / (3 * 64 + 32))
        assert all(p.prompt.abs().max() <= bound for p in model.adapters)
        assert len(model.adapters) == (1 if method == "vpt_shallow" else 2)
    # deep: block 1 sees block 0's output with its prompts cut and its own appended
    model = apply_method(build_lt_model(clip_dir, 3), "vpt_deep").eval()
    block1 = transformer_blocks(model)[0][1]
    seen = []
    block1.register_forward_pre_hook(lambda m, a, k: seen.append(a[0] if a else k["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        model(x)
    # hooks run in registration order: the prompt hook first
    assert torch.equal(seen[0][:, seq:], model.adapters[1].prompt.expand(2, -1, -1))


def test_mask_follows_lifts_ratio_rule_and_draw(vit_dir):
    """LIFT: ratio max(0.001, floor(K / (12 L D) / 0.001) * 0.001); per fused Linear int(n * ratio) entries of the
    [out, in + 1] matrix (bias last column) drawn by randperm(n) from one generator seeded with --mask_seed."""
    assert PM.lift_mask_ratio(100, 12, 768) == 0.001
    assert PM.lift_mask_ratio(8142, 12, 768) == pytest.approx(0.073)
    assert PM.lift_mask_ratio(1000, 24, 1024) == 0.003
    model = apply_method(build_lt_model(vit_dir, 3), "mask", mask_ratio=0.05, mask_seed=7)
    entries = model.adapters  # Linears in LIFT's order: per block q, k, v, attention output, fc1, fc2
    generator = torch.Generator().manual_seed(7)
    n_qkv = 96 * 33
    chosen = torch.randperm(n_qkv, generator=generator)[: int(n_qkv * 0.05)]
    k_rows = chosen[(chosen // 33 >= 32) & (chosen // 33 < 64)]
    k_weight = sorted(((r - 32) * 32 + c).item() for r, c in zip(k_rows // 33, k_rows % 33) if c < 32)
    assert entries.indices(1)[0].tolist() == k_weight
    assert sum(len(w) + len(b) for w, b in map(entries.indices, range(3))) == int(n_qkv * 0.05)
    # the trained entries replace the frozen ones: changing one moves the output exactly there
    blocks, parts, _ = transformer_blocks(model)
    fc1 = PM.block_part(blocks[0], parts, "fc1")
    first_fc1 = entries.spans[4][0]
    with torch.no_grad():
        entries.values[first_fc1] += 1.0
        row, col = divmod(entries.indices(4)[0][0].item(), 32)
        h = torch.randn(4, 32)
        delta = fc1(h) - torch.nn.functional.linear(h, fc1.weight, fc1.bias)
    assert torch.allclose(delta[:, row], h[:, col], atol=1e-5) and delta.abs().sum() == delta[:, row].abs().sum()
    with pytest.raises(UserError, match="a mask ratio of 1e-05 selects no entry of these blocks; raise --mask_ratio"):
        apply_method(build_lt_model(vit_dir, 3), "mask", mask_ratio=1e-5)


def test_lora_init_lift_draws_a_from_u_one_over_sqrt_r(clip_dir):
    """LIFT's A is (D, r): Kaiming-uniform bound 1/sqrt(r) (peft's (r, D) weight: 1/sqrt(D)); B stays zero."""
    lift = apply_method(build_lt_model(clip_dir, 3), "lora", r=4, lora_init="lift", seed=5)
    peft = apply_method(build_lt_model(clip_dir, 3), "lora", r=4, seed=5)
    a = lambda m, name: dict(m.named_parameters())[f"base_model.model.backbone.encoder.layers.{name}.lora_A.default.weight"]  # noqa: E731
    assert a(peft, "0.self_attn.q_proj").abs().max() <= 1 / math.sqrt(32)
    assert 0.4 < a(lift, "0.self_attn.q_proj").abs().max() <= 0.5
    every_a = torch.cat([p.flatten() for n, p in lift.named_parameters() if "lora_A" in n])
    assert every_a.std().item() == pytest.approx(0.5 / math.sqrt(3), rel=0.1)  # U(-b, b): b / sqrt(3)
    assert all(torch.count_nonzero(p) == 0 for n, p in lift.named_parameters() if "lora_B" in n)


# ---- each method end to end --------------------------------------------------------------------------------
def _adapter(export_dir):
    """A LoRA export's plain peft adapter: ({module as the base model names it: {"A": A, "B": B}}, lora_alpha / r)."""
    config = json.loads((export_dir / "adapter" / "adapter_config.json").read_text())
    factors = load_file(str(export_dir / "adapter" / "adapter_model.safetensors"))
    out = {}
    for key, value in factors.items():
        module, ab = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key).groups()
        out.setdefault(module, {})[ab] = value
    return out, config["lora_alpha"] / config["r"]


def _target_key(adapter_module, keys):
    """The LTModel weight key of a module named as the plain base model has it (e.g. vision_model.<module>)."""
    inner = {k: k.removeprefix("backbone.").removesuffix(".weight") for k in keys
             if k.startswith("backbone.") and k.endswith(".weight")}
    found = [k for k, m in inner.items() if adapter_module == m or adapter_module.endswith("." + m)]
    assert len(found) == 1, (adapter_module, found)
    return found[0]


# (method, backbone, extra flags): every new method once, CLIP and ViT alternating; one --partial_layers run
END_TO_END = [("ln", "vit", []), ("vpt_shallow", "clip", []), ("vpt_deep", "vit", []), ("adapter", "clip", []),
              ("mask", "vit", ["--mask_ratio", "0.05"]), ("lora_mlp", "clip", ["--lora_init", "lift"]),
              ("ssf_attn", "vit", []), ("ssf_mlp", "clip", []), ("ssf_ln", "vit", []), ("full", "clip", []),
              ("bitfit", "vit", []), ("adaptformer", "clip", ["--partial_layers", "1"])]


@pytest.mark.parametrize("method,backbone,extra", END_TO_END, ids=[m + ("_partial" if e and "--partial_layers" in e else "")
                                                                    for m, _, e in END_TO_END])
def test_method_trains_exports_reloads_evaluates_identically_and_resumes(method, backbone, extra, idx_dir, clip_dir,
                                                                         vit_dir, tmp_path):
    from accelerate import Accelerator

    from lt_utils import data_loaders as D
    from lt_utils.data import load_lt_dataset
    from lt_utils.engine import evaluate
    from lt_utils.soup import make_soup

    base_dir = clip_dir if backbone == "clip" else vit_dir
    flags = ["--method", method, "--model_name_or_path", base_dir, "--from_scratch", "false", "--max_train_steps", "4",
             "--eval_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "0.01", *extra]
    out = tmp_path / "run"
    run_main(tiny_train_args(idx_dir, out, *flags))
    model, meta = load_export(out / "best")
    config = method_config_of(MethodSpec.from_values(vars(build_train_parser().parse_args(
        ["--method", method, *map(str, extra)]))), 10, model.spec.num_layers)
    assert meta["method_config"] == config.to_record()  # the one record of the method's settings
    assert meta["method"] == method and config.partial_layers == (1 if "--partial_layers" in extra else None)

    # the export holds every tensor of the model once: those that do not train exactly as the base has them (with the
    # method's modules at their seeded init), and the trained ones moved
    stored = export_tensors(out / "best")
    assert set(stored) == set(model.state_dict())
    entry = METHODS.get(method)
    start = apply_method(build_lt_model(base_dir, 10), config)  # the model at step 0 (seed 0, as train_lt)
    if entry.peft:  # LoRA is merged: its targets hold base + (B @ A) * alpha / r of the exported plain adapter
        initial = build_lt_model(base_dir, 10).state_dict()
        trained = {re.sub(r"\.lora_[AB]\.default\.weight$", ".weight", n.removeprefix("base_model.model."))
                   for n, p in start.named_parameters() if p.requires_grad and ".lora_" in n}
        adapter, scaling = _adapter(out / "best")
        targets = {_target_key(module, initial): ab for module, ab in adapter.items()}
        assert set(targets) == trained and any(".fc2." in k for k in targets)
        for key, ab in targets.items():
            assert torch.equal(stored[key], initial[key] + (ab["B"] @ ab["A"]) * scaling), key
    else:
        initial = start.state_dict()
        trained = {n for n, p in start.named_parameters() if p.requires_grad}
    assert set(initial) == set(stored)
    untrained = [k for k in stored if k not in trained and not k.startswith("head.") and not torch.equal(stored[k], initial[k])]
    assert untrained == [], untrained[:3]
    moved = [k for k in trained if not k.startswith("head.") and not torch.equal(stored[k], initial[k])]
    assert moved

    # reloaded, it gives the val metrics measured in memory during training
    ds, info = load_lt_dataset("fashion_mnist_lt", data_dir=idx_dir, imb=10, max_per_class=40, val_per_class=5,
                               cache_dir=tmp_path / "hf_cache")
    val = evaluate(model, D.image_loader(ds["validation"], D.image_transforms(model.spec)[1], 64, 0), Accelerator(cpu=True),
                   info.groups, 10)
    recorded = json.loads((out / "best" / "metrics.json").read_text())["validation"]
    assert val["per_class_acc"] == recorded["per_class_acc"]
    assert val["nll"] == pytest.approx(recorded["nll"], rel=1e-5)

    # resumed from step 2, the same final weights
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "step_2", resumed / "step_2")
    run_main(tiny_train_args(idx_dir, resumed, *flags, "--resume_from_checkpoint", "latest"))
    pairs = [(export_tensors(out / "final"), export_tensors(resumed / "final"))]
    if entry.peft:  # and the plain adapter's factors
        pairs.append(tuple(load_file(str(d / "final" / "adapter" / "adapter_model.safetensors")) for d in (out, resumed)))
    for a, b in pairs:
        assert_resumed_weights(b, a)

    # soupable methods average; prompts do not
    if entry.soupable:
        make_soup([out / "best", out / "final"], tmp_path / "soup", progress=False)
        soup_meta = load_export(tmp_path / "soup")[1]
        assert soup_meta["method_config"] == {"name": "soup", "base": meta["method_config"]}
        assert not soup_meta["adapter"]  # LoRA soups: merged weights, no adapter
    else:
        with pytest.raises(UserError, match=f"--method {method}, whose exports cannot be averaged"):
            make_soup([out / "best", out / "final"], tmp_path / "soup", progress=False)


def test_dry_run_prints_the_counts_last_and_writes_nothing(idx_dir, clip_dir, tmp_path):
    """Through the CLI: the run header, then as the last stdout line the counts the table tests pin (same
    functions), and no output dir."""
    out = tmp_path / "never"
    proc = run_cli("train_lt.py", *tiny_train_args(idx_dir, out, "--model_name_or_path", clip_dir, "--from_scratch",
                                                   "false", "--method", "vpt_deep", "--dry_run"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    model = apply_method(build_lt_model(clip_dir, 10), "vpt_deep")
    assert counts["head"] == head_parameter_count(model) == 10 * 32
    assert counts["trainable"] == trainable_parameter_count(model) == 320 + 2 * 10 * 32
    assert counts["backbone"] == counts["trainable"] - counts["head"] and counts["method"] == "vpt_deep"
    assert "***** Dry run *****" in proc.stdout and "Trainable parameters = 960" in proc.stdout
    assert not out.exists()


@pytest.mark.parametrize("method", ["vpt_deep", "adapter", "mask", "ssf_attn"])
def test_gradient_checkpointing_gives_the_same_gradients(clip_dir, method):
    """Recomputed blocks re-run the prompt pre-hooks, the SSF/adapter hooks and the masked forwards."""
    from lt_utils.models import enable_gradient_checkpointing

    def grads(checkpointing):
        model = apply_method(build_lt_model(clip_dir, 3), method, seed=1).train()
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():  # a non-zero Up, so every adapter tensor gets a gradient
            for name, p in model.named_parameters():
                if ".up." in name:
                    p.copy_(torch.randn(p.shape, generator=generator))
        if checkpointing:
            enable_gradient_checkpointing(model)
        torch.nn.functional.cross_entropy(model(random_pixels(4)), torch.tensor([0, 1, 2, 0])).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and all(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-6, atol=1e-8, msg=name)
