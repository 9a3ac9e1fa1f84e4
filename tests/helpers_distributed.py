"""Shared by the distributed tests (test_distributed.py: DDP and multi-node; test_deepspeed.py: ZeRO-2/3): the
launchers, the steps every run trains, and the one-process reference they are compared with."""
import socket
import sys
from pathlib import Path

import pytest

from helpers_cli import run_cli
from helpers_train import export_tensors, reduction_order_atol, run_script, tiny_train_args
from helpers_train import REPO

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


def accelerate_launch(config, args, *launch_flags, cwd):
    """`accelerate launch --config_file accelerate_configs/CONFIG [launch_flags] train_lt.py args`, as the README shows
    it, from `cwd`: a folder outside the repository (the configs name nothing relative to the working directory)."""
    return run_script([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                       str(REPO / "accelerate_configs" / config), *launch_flags, str(REPO / "train_lt.py"), *args], cwd=cwd)


def two_processes_fp32(config, args, cwd):
    """CONFIG's launch with 2 processes in fp32 (the yamls say 8 and bf16), to compare with the 1-process reference."""
    return accelerate_launch(config, args, "--num_processes", "2", "--mixed_precision", "no", cwd=cwd)


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
