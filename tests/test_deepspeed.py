"""DeepSpeed ZeRO-2/3 on CPU, launched with torchrun and the environment accelerate's launcher derives from the
shipped yamls (helpers_distributed.deepspeed_env). Each run is compared with one process within the float32
reduction-order noise measured in-process (helpers_train.reduction_order_atol)."""
import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers_distributed import (NUM_STEPS, ONE_BATCH_OF_16, STEPS, deepspeed_env, failure_report, final_weights,
                                 torchrun, trained_in_process)
from helpers_train import REPO, assert_same_weights, reduction_order_atol, tiny_train_args

pytestmark = pytest.mark.slow  # torchrun and DeepSpeed: several processes per test


def zero2_run(idx_dir, out, nproc):
    accumulation = ["--gradient_accumulation_steps", str(3 - nproc)]  # the same global batch of 16
    result = torchrun(nproc, tiny_train_args(idx_dir, out, *STEPS, *accumulation, "--checkpointing_steps", "2"),
                      env=deepspeed_env())
    assert result.returncode == 0, failure_report(result)
    return out


@pytest.fixture(scope="module")
def zero2_two_processes(idx_dir, tmp_path_factory):
    """A 2-process ZeRO-2 run with a resume state at step 2 (its export and its resume are both tested)."""
    return zero2_run(idx_dir, tmp_path_factory.mktemp("ds2") / "run", 2)


@pytest.mark.parametrize("nproc", [1, 2])
def test_deepspeed_zero2_on_cpu_trains_and_exports(idx_dir, tmp_path, one_process_reference, nproc, request):
    out = request.getfixturevalue("zero2_two_processes") if nproc == 2 else zero2_run(idx_dir, tmp_path / "ds1", 1)
    assert (out / "step_2" / "pytorch_model").is_dir()  # a DeepSpeed (ZeRO) resume state, not a DDP one
    sys.path.insert(0, str(REPO))
    from lt_utils.checkpoint import load_export

    model, meta = load_export(out / "final")
    assert meta["method"] == "full_all"
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 28, 28)).shape == (2, 10)
    # ZeRO-2 in fp32 is the same optimisation as DDP: same weights as the 1-process reference
    assert_same_weights(final_weights(out), *one_process_reference)
    assert json.loads((out / "final" / "metrics.json").read_text())["test"]["num_samples"] == 100


def test_deepspeed_accumulation_mismatch_is_refused(idx_dir, tmp_path):
    out = tmp_path / "run"
    result = torchrun(1, tiny_train_args(idx_dir, out, *STEPS, "--gradient_accumulation_steps", "2"),
                      env=deepspeed_env("ds_zero2.yaml", "--gradient_accumulation_steps", "4"))
    assert result.returncode != 0
    assert "DeepSpeed config has gradient_accumulation_steps=4 but --gradient_accumulation_steps=2" in result.stderr
    assert 'train_lt.py", line' not in result.stderr  # our process printed no traceback (torchrun reports the exit itself)
    assert not (out / "final").exists()


def test_deepspeed_zero3_lora_export_is_complete(idx_dir, tmp_path):
    """ZeRO-3 partitions every parameter; an export without the 16-bit gather would hold empty tensors."""
    sys.path.insert(0, str(REPO))
    from helpers_models import make_tiny_clip
    from lt_utils.checkpoint import load_export

    clip = make_tiny_clip(tmp_path / "clip", image_size=28, patch_size=4)
    out = tmp_path / "z3"
    args = tiny_train_args(idx_dir, out, *STEPS, "--gradient_accumulation_steps", "1")
    for flag, value in (("--model_name_or_path", clip), ("--method", "lora"), ("--from_scratch", "false"),
                        ("--head_init", "text")):
        args[args.index(flag) + 1] = str(value)
    result = torchrun(2, args, env=deepspeed_env("ds_zero3.yaml"))
    assert result.returncode == 0, failure_report(result)
    adapter = load_file(out / "final" / "adapter" / "adapter_model.safetensors")
    lora = {k: v for k, v in adapter.items() if "lora_" in k}
    # r = 2 (bottleneck rule: 10 classes, 2 layers), q_proj and v_proj of 2 layers, hidden 32; cosine head 10 x 32
    assert sum(v.numel() for v in lora.values()) == 2 * 2 * (2 * 32 + 32 * 2)
    assert load_file(out / "final" / "adapter" / "head.safetensors")["weight"].numel() == 10 * 32
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # trained: B starts at zero
    model, meta = load_export(out / "final")
    assert json.loads((out / "final" / "adapter" / "adapter_config.json").read_text())["r"] == 2
    with torch.no_grad():
        assert torch.isfinite(model(torch.zeros(2, 3, 28, 28))).all()


def test_zero3_without_16bit_gather_is_refused_before_training(idx_dir, tmp_path):
    out = tmp_path / "run"
    result = torchrun(1, tiny_train_args(idx_dir, out, *STEPS),
                      env=deepspeed_env("ds_zero3.yaml", "--zero3_save_16bit_model", "false"))
    assert result.returncode != 0
    assert "zero3_save_16bit_model: true" in result.stderr
    assert not (out / "step_1").exists() and not (out / "final").exists()


def test_deepspeed_resume_ends_with_the_same_weights(idx_dir, tmp_path, one_process_reference, zero2_two_processes):
    out = zero2_two_processes
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "step_2", resumed / "step_2")
    again = torchrun(2, tiny_train_args(idx_dir, resumed, *STEPS, "--checkpointing_steps", "2",
                                        "--resume_from_checkpoint", "latest"), env=deepspeed_env())
    assert again.returncode == 0, failure_report(again)
    assert "Resumed from" in again.stderr + again.stdout
    assert_same_weights(final_weights(resumed), *one_process_reference)


@pytest.mark.parametrize("method,extra", [("mask", ["--mask_ratio", "0.05"]), ("vpt_deep", [])])
def test_deepspeed_zero3_trains_added_modules_as_one_process(idx_dir, tmp_path, method, extra):
    """Methods that add modules (masked entries read inside the Linear's forward, prompts in a block pre-hook) under
    ZeRO-3, where every parameter is partitioned: 2 processes x 8 images end with the weights of 1 process x 8 x 2
    accumulation steps."""
    from helpers_models import make_tiny_clip

    clip = make_tiny_clip(tmp_path / "clip", image_size=28, patch_size=4)

    def args(out, accumulation, steps=STEPS):
        flags = tiny_train_args(idx_dir, out, *steps, "--gradient_accumulation_steps", str(accumulation), *extra)
        for flag, value in (("--model_name_or_path", clip), ("--method", method), ("--from_scratch", "false")):
            flags[flags.index(flag) + 1] = str(value)
        return flags

    ref = trained_in_process(args(tmp_path / "ref", 2))
    atol = reduction_order_atol(ref, trained_in_process(args(tmp_path / "batch16", 1, ONE_BATCH_OF_16)), NUM_STEPS)
    result = torchrun(2, args(tmp_path / "z3", 1), env=deepspeed_env("ds_zero3.yaml"))
    assert result.returncode == 0, failure_report(result)
    weights = final_weights(tmp_path / "z3")
    assert {k.split(".")[0] for k in weights} == {"backbone", "adapters", "head"}  # the whole model, once
    assert_same_weights(weights, ref, atol)
    init = load_file(tmp_path / "z3" / "final" / "head_init.safetensors")["weight"]
    assert not torch.allclose(weights["head.weight"], init)
