"""DeepSpeed ZeRO-2/3 on CPU through `accelerate launch` and the shipped yamls, 2 processes in fp32; each run is
compared with one process within the float32 reduction-order noise measured in-process
(helpers_train.reduction_order_atol). Refusals run in-process under the environment accelerate's launcher derives
from the yamls (helpers_distributed.deepspeed_env). The yamls' own bf16 is launched in test_launch.py."""
import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers_cli import run_cli
from helpers_distributed import (NUM_STEPS, ONE_BATCH_OF_16, STEPS, deepspeed_env, failure_report, final_weights,
                                 free_port, trained_in_process, two_processes_fp32)
from helpers_train import REPO, assert_same_weights, reduction_order_atol, tiny_train_args

pytestmark = pytest.mark.slow  # accelerate launch and DeepSpeed: three interpreters per run


def one_process():
    """One process of a launch, as accelerate's launcher starts it: a rendezvous of one on a free port (the refusals
    run in-process)."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0",
            "WORLD_SIZE": "1"}


@pytest.fixture(scope="module")
def zero2_two_processes(idx_dir, tmp_path_factory):
    """A 2-process ZeRO-2 run with a resume state at step 2 (its export and its resume are both tested)."""
    out = tmp_path_factory.mktemp("ds2") / "run"
    result = two_processes_fp32("ds_zero2.yaml", tiny_train_args(idx_dir, out, *STEPS, "--checkpointing_steps", "2"),
                                out.parent)
    assert result.returncode == 0, failure_report(result)
    assert "Processes = 2 (DEEPSPEED)" in result.stderr + result.stdout
    return out


def test_deepspeed_zero2_on_cpu_trains_and_exports(zero2_two_processes, one_process_reference):
    out = zero2_two_processes
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
    result = run_cli("train_lt.py", *tiny_train_args(idx_dir, out, *STEPS, "--gradient_accumulation_steps", "2"),
                     env={**deepspeed_env("ds_zero2.yaml", "--gradient_accumulation_steps", "4"), **one_process()})
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        "error: DeepSpeed config has gradient_accumulation_steps=4 but --gradient_accumulation_steps=2; set one of them "
        "so they agree (or 'auto' in the DeepSpeed config)")
    assert "Traceback" not in result.stderr and not (out / "final").exists()


def test_zero3_without_16bit_gather_is_refused_before_training(idx_dir, tmp_path):
    out = tmp_path / "run"
    result = run_cli("train_lt.py", *tiny_train_args(idx_dir, out, *STEPS),
                     env={**deepspeed_env("ds_zero3.yaml", "--zero3_save_16bit_model", "false"), **one_process()})
    assert result.returncode == 2 and "zero3_save_16bit_model: true" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert not (out / "step_1").exists() and not (out / "final").exists()


def test_deepspeed_resume_ends_with_the_same_weights(idx_dir, tmp_path, one_process_reference, zero2_two_processes):
    out = zero2_two_processes
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "step_2", resumed / "step_2")
    again = two_processes_fp32("ds_zero2.yaml", tiny_train_args(idx_dir, resumed, *STEPS, "--checkpointing_steps", "2",
                                                                "--resume_from_checkpoint", "latest"), tmp_path)
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
    result = two_processes_fp32("ds_zero3.yaml", args(tmp_path / "z3", 1), tmp_path)
    assert result.returncode == 0, failure_report(result)
    weights = final_weights(tmp_path / "z3")
    assert {k.split(".")[0] for k in weights} == {"backbone", "adapters", "head"}  # the whole model, once
    assert_same_weights(weights, ref, atol)
    init = load_file(tmp_path / "z3" / "final" / "head_init.safetensors")["weight"]
    assert not torch.allclose(weights["head.weight"], init)
