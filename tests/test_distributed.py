"""Distributed training on CPU: DDP (gloo), launched with `accelerate launch` and the shipped multi_gpu.yaml, with
torchrun as on a GPU node, and multi_node.yaml as two `accelerate launch` machines on the loopback address. Each run
is compared with one process within the float32 reduction-order noise measured in-process
(helpers_train.reduction_order_atol)."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers_distributed import (NUM_STEPS, ONE_BATCH_OF_16, STEPS, failure_report, final_weights, free_port, torchrun,
                                 trained_in_process, two_processes_fp32)
from helpers_train import QUIET_ENV, REPO, assert_same_weights, reduction_order_atol, tiny_train_args

pytestmark = pytest.mark.slow  # torchrun and DeepSpeed: several processes per test


LAUNCHERS = {  # the README's two ways to start DDP
    "multi_gpu_yaml": lambda args, cwd: two_processes_fp32("multi_gpu.yaml", args, cwd),
    "torchrun": lambda args, cwd: torchrun(2, args)}


@pytest.mark.parametrize("launcher,augment", [("multi_gpu_yaml", []), ("torchrun", ["--augment_on_device"])],
                         ids=["multi_gpu_yaml", "torchrun_augment_on_device"])
def test_two_processes_match_one_process_with_accumulation(idx_dir, tmp_path, one_process_reference, launcher, augment):
    """DDP on 2 processes = 1 process with accumulation, through multi_gpu.yaml and through torchrun; also when each
    process finishes its batches' crops on its own device (--augment_on_device: the boxes come from the same
    per-sample generators)."""
    out = tmp_path / "ddp"
    result = LAUNCHERS[launcher](tiny_train_args(idx_dir, out, *STEPS, *augment), tmp_path)
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
