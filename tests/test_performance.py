"""--torch_compile and --gradient_checkpointing give eager's numbers and keys; the throughput benchmark's smoke run."""
import json
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from helpers_cli import run_cli
from helpers_train import REPO, python_script, tiny_train_args

sys.path.insert(0, str(REPO))
from lt_utils.compile import COMPILE_PREFIX, keep_eager_state_keys  # noqa: E402
from lt_utils.models import build_lt_model, enable_gradient_checkpointing  # noqa: E402
from lt_utils.peft_methods import apply_method  # noqa: E402


def method_model(model_dir, method, layers_seed=0):
    lt = build_lt_model(model_dir, 5, from_scratch=True, seed=layers_seed)
    model = apply_method(lt, method, r=4)
    torch.manual_seed(1)  # zero-initialised up-projections (AdaptFormer up, LoRA B) would leave the rest no gradient
    for name, param in model.named_parameters():
        if ".up.weight" in name or "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
        if ".down.bias" in name:  # ReLU open for the CLS token too
            torch.nn.init.constant_(param, 1.0)
    return model, lt


def loss_and_grads(model, pixels, labels):
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(pixels), labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["clip", "vit"])
@pytest.mark.parametrize("method", ["full", "lora", "adaptformer"])
def test_gradient_checkpointing_gives_the_same_gradients(clip_dir, vit_dir, kind, method):
    model_dir = clip_dir if kind == "clip" else vit_dir
    pixels, labels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3])
    model, lt = method_model(model_dir, method)
    model.train()
    loss, grads = loss_and_grads(model, pixels, labels)
    enable_gradient_checkpointing(lt)
    assert lt.backbone.is_gradient_checkpointing
    ckpt_loss, ckpt_grads = loss_and_grads(model, pixels, labels)
    assert torch.equal(loss, ckpt_loss)
    assert grads.keys() == ckpt_grads.keys() and len(grads) > 1
    nonzero = [name for name in grads if grads[name].abs().sum() > 0]
    assert len(nonzero) > 0.7 * len(grads), sorted(set(grads) - set(nonzero))  # the backbone's trainables do learn
    for name in grads:
        torch.testing.assert_close(ckpt_grads[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


def saved_activation_bytes(model, pixels):
    """Bytes autograd keeps for the backward pass (saved tensors, counted once each) of one forward."""
    seen, total = set(), 0

    def pack(tensor):
        nonlocal total
        key = (tensor.untyped_storage().data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key not in seen and not isinstance(tensor, torch.nn.Parameter):
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(pixels).sum().backward()
    return total


def test_gradient_checkpointing_keeps_less_for_the_backward(vit_dir, tmp_path):
    from helpers_models import make_tiny_vit

    deep = make_tiny_vit(tmp_path / "deep", layers=8, hidden=64, heads=4, weights=False)
    model, lt = method_model(deep, "full")
    model.train()
    pixels = torch.randn(8, 3, 32, 32)
    plain = saved_activation_bytes(model, pixels)
    enable_gradient_checkpointing(lt)
    checkpointed = saved_activation_bytes(model, pixels)
    assert checkpointed < 0.5 * plain, (checkpointed, plain)


@pytest.mark.slow  # torch.compile's inductor builds C++ (minutes on a fresh machine)
def test_compiled_model_matches_eager_and_keeps_eager_keys(vit_dir):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from lt_utils.compile import dynamo_plugin
    from lt_utils.spec import CompileSpec

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, dynamo_plugin=dynamo_plugin(
        CompileSpec(torch_compile=True, torch_compile_backend="inductor", torch_compile_mode=None)))
    eager, _ = method_model(vit_dir, "adaptformer")
    twin, _ = method_model(vit_dir, "adaptformer")
    compiled = keep_eager_state_keys(accelerator.prepare_model(twin))
    assert hasattr(compiled, "_orig_mod")  # accelerate did compile it
    pixels, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    eager.train(), compiled.train()
    loss, grads = loss_and_grads(eager, pixels, labels)
    c_loss, c_grads = loss_and_grads(compiled, pixels, labels)
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(c_grads[COMPILE_PREFIX + name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # state dicts: eager keys out, eager keys in (resume states and exports do not depend on the flag)
    state = compiled.state_dict()
    assert list(state) == list(eager.state_dict())
    with torch.no_grad():
        eager.head.weight.add_(1.0)
    result = compiled.load_state_dict(eager.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(twin.head.weight, eager.head.weight)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.slow  # torch.compile
def test_train_lt_compiled_resume_and_export_match_eager(idx_dir, tmp_path):
    """An eager run checkpointed at step 2; a --torch_compile run resumed from it ends at the eager weights, and its
    resume state and export carry the eager keys. (aot_eager: dynamo's wrapper without inductor's C++ build)."""
    flags = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--eval_steps", "none", "--gradient_checkpointing",
             "--ema_decay", "0.9"]
    eager = tmp_path / "eager"
    result = run_cli("train_lt.py", *tiny_train_args(idx_dir, eager, *flags))
    assert result.returncode == 0, result.stderr[-3000:]
    compiled = tmp_path / "compiled"
    compiled.mkdir()
    shutil.copytree(eager / "step_2", compiled / "step_2")
    resume = ["--resume_from_checkpoint", "latest", "--torch_compile", "--torch_compile_backend", "aot_eager"]
    result = run_cli("train_lt.py", *tiny_train_args(idx_dir, compiled, *flags, *resume))
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("final/model.safetensors", "step_4/model.safetensors"):
        a, b = load_file(eager / name), load_file(compiled / name)
        assert list(a) == list(b) and not any(COMPILE_PREFIX in k for k in b), name
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=key)
    ema = torch.load(compiled / "step_4" / "custom_checkpoint_1.pkl", weights_only=False)
    assert ema["shadow"] and not any(COMPILE_PREFIX in k for k in ema["shadow"])
    eager_test = json.loads((eager / "all_results.json").read_text())["final"]["test"]
    compiled_test = json.loads((compiled / "all_results.json").read_text())["final"]["test"]
    assert compiled_test["accuracy"] == eager_test["accuracy"]
    # eval_lt.py --torch_compile on the eager export: the numbers train_lt.py recorded
    result = run_cli("eval_lt.py", eager / "final", "--torch_compile", "--torch_compile_backend", "aot_eager",
                     "--data_dir", idx_dir, "--cache_dir", tmp_path / "hf_cache", "--num_workers", "0",
                     "--output_dir", tmp_path / "eval")
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert evaluated["accuracy"] == eager_test["accuracy"] and evaluated["per_class_acc"] == eager_test["per_class_acc"]


def test_train_lt_augment_on_device_trains_the_same_weights_and_resumes(idx_dir, tmp_path):
    """--augment_on_device through the CLI: the same boxes finished on the batch's device give the weights of the
    loader-side augmentation (bit for bit on CPU), and a run resumed with it (two loader workers) ends there too."""
    flags = ["--augment", "rrc_flip", "--max_train_steps", "4", "--checkpointing_steps", "2", "--eval_steps", "none"]
    plain, device = tmp_path / "plain", tmp_path / "device"
    for out, extra in ((plain, []), (device, ["--augment_on_device"])):
        result = run_cli("train_lt.py", *tiny_train_args(idx_dir, out, *flags, *extra))
        assert result.returncode == 0, result.stderr[-3000:]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(plain / "step_2", resumed / "step_2")
    result = run_cli("train_lt.py", *tiny_train_args(idx_dir, resumed, *flags, "--augment_on_device",
                                                     "--resume_from_checkpoint", "latest", "--num_workers", "2",
                                                     "--resume_allow_changes"))
    assert result.returncode == 0, result.stderr[-3000:]
    expected = load_file(plain / "final" / "model.safetensors")
    start = load_file(plain / "step_2" / "model.safetensors")
    assert any(not torch.equal(start[k], load_file(plain / "step_4" / "model.safetensors")[k]) for k in start)
    for out in (device, resumed):
        weights = load_file(out / "final" / "model.safetensors")
        assert list(weights) == list(expected)
        assert all(torch.equal(weights[k], expected[k]) for k in expected), out.name
    assert yaml.safe_load((device / "config.yaml").read_text())["augment_on_device"] is True


@pytest.mark.slow  # the benchmark script, a fresh interpreter
def test_throughput_benchmark_quick_run_writes_every_section(tmp_path):
    """The benchmark script end to end with tiny settings: the JSON has every section, ratio and repeat (no timing
    assertions: numbers from a smoke run mean nothing)."""
    result = python_script("benchmarks/bench_throughput.py", "--quick", "--repeats", "2", "--out_dir", tmp_path,
                           timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "throughput.json").read_text())
    assert data["benchmark"] == "throughput" and data["setup"]["quick"] is True and data["machine"]["cpu_count"] >= 1
    expected = {"train": {"adaptformer/fp32: compiled / eager", "adaptformer: bf16 / fp32 (eager)",
                          "full: bf16 / fp32 (eager)"},
                "loader": {"project / lift_style", "project / previous", "on_device_loader / lift_style",
                           "on_device_loader + device step / project"}, "eval": {"fivecrop / one view (time)"},
                "head": {"naive / cached over 3 epochs", "augmented / cached over 3 epochs"},
                "memory": {"checkpointed / plain (activation memory)"}}
    for section, names in expected.items():
        ratios = data[section]["ratios"]
        assert names <= set(ratios), (section, sorted(ratios))
        for name, s in ratios.items():
            assert len(s["runs"]) == 2 and s["min"] <= s["median"] <= s["max"] and s["min"] > 0, (section, name)
        assert len(data[section]["repeats"]) == 2
    train = data["train"]
    assert set(train["images_per_s"]) == {f"{m}/{p}/{c}" for m in ("adaptformer", "lora", "bitfit", "full")
                                          for p in ("fp32", "bf16") for c in ("eager",)} | {
        "adaptformer/fp32/compiled", "adaptformer/bf16/compiled"}
    assert all(train["flops_per_image"][m] > 0 for m in ("adaptformer", "lora", "bitfit", "full"))
    assert train["flops_per_image"]["full"] > train["flops_per_image"]["bitfit"]  # weight gradients cost FLOPs
    assert 0 < train["fraction_of_matmul_peak"]["full/fp32/eager"]["median"] < 10
    assert data["memory"]["checkpointed_mib"] < data["memory"]["plain_mib"]
    budget = data["budget"]["rows"]
    assert set(budget) == {f"{m}/batch 2/{p}" for m in ("adaptformer", "full") for p in ("fp32", "16-bit")}
    for row in budget.values():
        assert 0 < row["activations_checkpointed_gib"] < row["activations_gib"] and row["static_gib"] > 0
    # a 16-bit model saves the same tensors at two bytes each (the attention's log-sum-exp stays fp32)
    half, full = (budget[f"adaptformer/batch 2/{p}"]["activations_gib"] for p in ("16-bit", "fp32"))
    assert 0.5 <= half / full < 0.6
    assert data["loader"]["decoded_bytes"] == data["loader"]["train_images"] * 32 * 32 * 3
    assert data["head"]["max_abs_head_diff"] < 1e-5  # both head-only paths train the same head
    assert all(1 < bound < 100 for bound in train["compile_bound"].values())  # 1 / (GEMM + attention + conv share)
    shares = train["eager_op_shares"]["full/fp32/eager"]
    assert set(shares) == {"gemm", "attention", "convolution", "other"} and abs(sum(shares.values()) - 1) < 1e-9
    assert shares["gemm"] > 0 and shares["convolution"] > 0  # the matcher finds the linears and the patch embedding
