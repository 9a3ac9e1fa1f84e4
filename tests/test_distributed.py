"""Distributed training on CPU: DDP (gloo) and DeepSpeed ZeRO-2/3, launched with torchrun as on a GPU node (with the
environment accelerate's launcher derives from the shipped yamls), and multi_node.yaml as two `accelerate launch`
machines on the loopback address. Each run is compared with one process within the float32 reduction-order noise
measured in-process (helpers_train.reduction_order_atol)."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers_cli import run_cli
from helpers_train import (QUIET_ENV, REPO, assert_same_weights, export_tensors, reduction_order_atol, run_script,
                           tiny_train_args)

pytestmark = pytest.mark.slow  # torchrun and DeepSpeed: several processes per test

# 159 training images; 4 optimizer steps of 16 images never reach the trailing partial batch, so every step
# sees exactly the same 16 images whether they come as 2 processes x 8 or 1 process x 8 x 2 accumulation steps.
# SGD, not Adam: Adam divides by sqrt(v), which turns float summation-order noise in near-zero gradients into
# full-size updates, so two exact-in-math runs would not agree to 1e-5.
STEPS = ["--max_train_steps", "4", "--eval_steps", "none", "--per_device_train_batch_size", "8",
         "--optimizer", "sgd", "--learning_rate", "0.05"]


def failure_report(result):
    """What a failed torchrun printed: every rank's error lines, not only torchrun's own summary."""
    lines = result.stderr.splitlines()
    picked = [line for line in lines if "Error" in line or "error:" in line or line.startswith("[rank")]
    return "\n".join(picked[-60:]) or result.stderr[-3000:]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc, args, env=None):
    return run_script([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                       "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "train_lt.py", *args], env=env)


def deepspeed_env(config="ds_zero2.yaml", *launch_flags):
    """What `accelerate launch --config_file CONFIG --mixed_precision no [launch_flags]` gives its processes, computed
    by accelerate's own launcher code from the shipped yaml (fp32, to compare with the 1-process reference)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(REPO / "accelerate_configs" / config),
                                               "--num_processes", "1", "--mixed_precision", "no", *launch_flags,
                                               "train_lt.py"])
    args, defaults, _ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    return {key: value for key, value in env.items() if key.startswith("ACCELERATE_")}


def final_weights(out):
    return export_tensors(out / "final")


NUM_STEPS = int(STEPS[1])
ONE_BATCH_OF_16 = [s if s != "8" else "16" for s in STEPS]  # the global batch in one micro-batch


def trained_in_process(flags):
    result = run_cli("train_lt.py", *flags)
    assert result.returncode == 0, failure_report(result)
    return final_weights(Path(flags[flags.index("--output_dir") + 1]))


@pytest.fixture(scope="module")
def one_process_reference(idx_dir, tmp_path_factory):
    """1 process, micro-batch 8, accumulation 2: the global batch of the 2-process runs; and its atol per tensor,
    from the same training as 1 micro-batch of 16 (another order of the same sums)."""
    out = tmp_path_factory.mktemp("ref")
    result = run_cli("train_lt.py", *tiny_train_args(idx_dir, out / "run", *STEPS, "--gradient_accumulation_steps", "2"))
    assert result.returncode == 0, failure_report(result)
    assert "Total batch size (per device x processes x accumulation) = 16" in result.stderr + result.stdout
    reference = final_weights(out / "run")
    reordered = trained_in_process(tiny_train_args(idx_dir, out / "batch16", *ONE_BATCH_OF_16))
    return reference, reduction_order_atol(reference, reordered, NUM_STEPS)


@pytest.mark.parametrize("augment", [[], ["--augment_on_device"]], ids=["loader_augment", "augment_on_device"])
def test_two_processes_match_one_process_with_accumulation(idx_dir, tmp_path, one_process_reference, augment):
    """DDP on 2 processes = 1 process with accumulation; also when each process finishes its batches' crops on its
    own device (--augment_on_device: the boxes come from the same per-sample generators)."""
    out = tmp_path / "ddp"
    result = torchrun(2, tiny_train_args(idx_dir, out, *STEPS, *augment))
    assert result.returncode == 0, failure_report(result)
    assert "Total batch size (per device x processes x accumulation) = 16" in result.stderr + result.stdout
    weights = final_weights(out)
    assert_same_weights(weights, *one_process_reference)
    start = load_file(out / "final" / "head_init.safetensors")["weight"]
    assert not torch.allclose(weights["head.weight"], start)  # it trained


def test_multi_node_yaml_on_two_loopback_machines_matches_one_process_with_accumulation(idx_dir, tmp_path,
                                                                                       one_process_reference):
    """accelerate_configs/multi_node.yaml as users run it on two machines, both on 127.0.0.1: one `accelerate launch`
    per machine rank, one process each (fp32), from outside the repository, into one shared output folder."""
    out, port = tmp_path / "run", free_port()
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "accelerate_configs" / "multi_node.yaml"), "--num_machines", "2", "--num_processes", "2",
                "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--mixed_precision", "no"]
    train = [str(REPO / "train_lt.py"), *tiny_train_args(idx_dir, out, *STEPS)]
    logs = [tmp_path / f"machine{rank}.log" for rank in (0, 1)]
    machines = []
    for rank, log in enumerate(logs):  # a log file each: two pipes read one after the other could fill and block
        with open(log, "w") as sink:
            machines.append(subprocess.Popen([*launcher, "--machine_rank", str(rank), *train], cwd=tmp_path,
                                             env={**os.environ, **QUIET_ENV}, stdout=sink, stderr=subprocess.STDOUT))
    codes = [machine.wait(timeout=600) for machine in machines]
    printed = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(text[-3000:] for text in printed)
    assert "Total batch size (per device x processes x accumulation) = 16" in printed[0]
    weights = final_weights(out)
    assert_same_weights(weights, *one_process_reference)
    assert not torch.allclose(weights["head.weight"], load_file(out / "final" / "head_init.safetensors")["weight"])


@pytest.mark.parametrize("nproc", [1, 2])
def test_deepspeed_zero2_on_cpu_trains_and_exports(idx_dir, tmp_path, one_process_reference, nproc):
    out = tmp_path / f"ds{nproc}"
    accumulation = ["--gradient_accumulation_steps", str(3 - nproc)]  # the same global batch of 16
    result = torchrun(nproc, tiny_train_args(idx_dir, out, *STEPS, *accumulation, "--checkpointing_steps", "2"),
                      env=deepspeed_env())
    assert result.returncode == 0, failure_report(result)
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


def test_deepspeed_resume_ends_with_the_same_weights(idx_dir, tmp_path, one_process_reference):
    out = tmp_path / "ds"
    first = torchrun(2, tiny_train_args(idx_dir, out, *STEPS, "--checkpointing_steps", "2"), env=deepspeed_env())
    assert first.returncode == 0, failure_report(first)
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


def test_two_processes_with_sync_bn_match_one_process_with_the_global_batch(idx_dir, tmp_path):
    """BatchNorm: 2 processes x 8 with --sync_bn normalise over the global 16, as 1 process x 16 does (weights and
    running statistics); without it each process would normalise over its own 8."""
    resnet = ["--model_name_or_path", str(REPO / "configs" / "models" / "cifar_resnet8"), "--head_type", "linear"]
    one = trained_in_process(tiny_train_args(idx_dir, tmp_path / "one", *ONE_BATCH_OF_16, *resnet))
    # the same batch of 16 with PyTorch's own convolution kernels instead of oneDNN's: another order of the same
    # sums, the CPU-dependent part (a batch of 16 cannot be split in one process without changing BatchNorm's math)
    with torch.backends.mkldnn.flags(enabled=False):
        reordered = trained_in_process(tiny_train_args(idx_dir, tmp_path / "native", *ONE_BATCH_OF_16, *resnet))
    ddp = torchrun(2, tiny_train_args(idx_dir, tmp_path / "ddp", *STEPS, *resnet, "--sync_bn"),
                   env={"ACCELERATE_USE_CPU": "1"})
    assert ddp.returncode == 0, failure_report(ddp)
    two = final_weights(tmp_path / "ddp")
    assert two["backbone.bn1.num_batches_tracked"].item() == 4
    assert_same_weights(two, one, reduction_order_atol(one, reordered, NUM_STEPS))
    assert not torch.allclose(two["backbone.bn1.running_mean"], torch.zeros(8))  # statistics were tracked
