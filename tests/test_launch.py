"""Every shipped accelerate config through the real `accelerate launch` CLI from outside the repository (one CPU
process, a few steps), the multi-node config through accelerate's own validation (and for real in
test_distributed); `--cpu` with a multi-process config refused; on the way: secrets never recorded, each log line
once, test metrics in the tracker."""
import json
import sys
from pathlib import Path

import pytest

from helpers_train import REPO, run_script, tiny_train_args

pytestmark = pytest.mark.slow  # accelerate launch: two interpreters per test

CONFIGS = REPO / "accelerate_configs"
SECRET = "hf_SECRETtoken0123456789"
STEPS = ["--max_train_steps", "2", "--eval_steps", "1", "--per_device_train_batch_size", "8"]


def launch(config, out, idx_dir, *extra, launch_flags=("--num_processes", "1"), ok=True):
    """`accelerate launch --config_file CONFIG --num_processes 1 [flags] train_lt.py ...` as the README shows it (the
    one-process override is the only change), from a working directory outside the repository: the configs name
    nothing relative to it."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config), *launch_flags,
           str(REPO / "train_lt.py"), *tiny_train_args(idx_dir, out), *STEPS, *extra]
    res = run_script(cmd, cwd=Path(out).parent)
    assert (res.returncode == 0) == ok, res.stderr[-4000:]
    return res


def all_text(out):
    """Every file a run wrote, as bytes (exports, logs, config, tracker events)."""
    return {p: p.read_bytes() for p in Path(out).rglob("*") if p.is_file()}


def scalars(out, prefix):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in Path(out).rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if tag.startswith(prefix):
                values[tag] = acc.Scalars(tag)[-1].value
    return values


def test_single_gpu_yaml_tracking_secrets_and_log_lines(idx_dir, tmp_path):
    out = tmp_path / "single"
    res = launch("single_gpu.yaml", out, idx_dir, "--with_tracking", "--report_to", "tensorboard",
                 "--hub_token", SECRET, "--hub_model_id", "me/x")
    assert "Processes = 1 (NO), mixed precision = bf16" in res.stderr  # the yaml's bf16 reached the Accelerator
    # each validation line is printed once (tqdm's redirect and the root handler used to print it twice)
    printed = res.stdout + res.stderr
    for step in (1, 2):
        assert printed.count(f"step {step}: validation acc") == 1
    # the token is nowhere: config.yaml, tracker hparams and events, logs, exports, cards, console
    assert SECRET not in printed
    leaks = [p for p, data in all_text(out).items() if SECRET.encode() in data]
    assert leaks == []
    assert "hub_token: null" in (out / "config.yaml").read_text()
    # test metrics of best/ and final/ reach the tracker, equal to all_results.json
    results = json.loads((out / "all_results.json").read_text())
    logged = scalars(out, "test_")
    for name in ("best", "final"):
        for key in ("accuracy", "mean_class_acc", "few_acc", "nll"):
            assert logged[f"test_{name}/{key}"] == pytest.approx(results[name]["test"][key], rel=1e-6)


def test_multi_gpu_yaml(idx_dir, tmp_path):
    res = launch("multi_gpu.yaml", tmp_path / "ddp", idx_dir)
    assert "mixed precision = bf16" in res.stderr
    assert (tmp_path / "ddp" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("config,stage", [("ds_zero2.yaml", 2), ("ds_zero3.yaml", 3)])
def test_deepspeed_yamls(idx_dir, tmp_path, config, stage):
    """The README's ZeRO command (bf16 from the yaml, accumulation from train_lt.py's flag), its DeepSpeed settings
    inline in the yaml."""
    out = tmp_path / f"zero{stage}"
    res = launch(config, out, idx_dir, "--total_batch_size", "16", "--gradient_accumulation_steps", "2",
                 "--checkpointing_steps", "1")
    assert "Processes = 1 (DEEPSPEED), mixed precision = bf16" in res.stderr  # the yaml's bf16
    shards = sorted(p.name for p in (out / "step_1" / "pytorch_model").iterdir())
    assert any(name.startswith("bf16_zero_pp_rank_0") for name in shards), shards  # ZeRO optimizer shards in bf16
    assert (out / "final" / "model.safetensors").is_file()
    assert json.loads((out / "all_results.json").read_text())["final"]["test"]["num_samples"] > 0


def test_every_shipped_config_is_tested():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == [
        "ds_zero2.yaml", "ds_zero3.yaml", "multi_gpu.yaml", "multi_node.yaml", "single_gpu.yaml"]


def test_multi_node_yaml_validates():
    """Loaded and validated by accelerate's launcher itself, down to the torchrun rendezvous it would start."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / "multi_node.yaml"), "train_lt.py"])
    args, defaults, _ = _validate_launch_command(args)
    assert defaults.distributed_type.value == "MULTI_GPU" and args.multi_gpu and not args.use_deepspeed
    env = prepare_multi_gpu_env(args)
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 0)
    assert args.rdzv_endpoint == "10.0.0.1:29500" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_cpu_flag_with_the_multi_node_config_is_refused(idx_dir, tmp_path):
    """`accelerate launch --cpu` starts one process whatever the config asks for: here each machine would train alone
    at half the batch, two independent runs into one folder. The process sees the rendezvous it was set up for and
    stops before any work."""
    out = tmp_path / "run"
    res = launch("multi_node.yaml", out, idx_dir, launch_flags=("--cpu",), ok=False)
    assert "error: `accelerate launch` started this process alone" in res.stderr
    assert "drop --cpu" in res.stderr and 'train_lt.py", line' not in res.stderr
    assert not out.exists()


ONE_PROCESS_LAUNCHER = {"ACCELERATE_USE_CPU": "True"}  # accelerate's simple launcher sets it, True or False
RENDEZVOUS = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("env,refused", [
    ({**ONE_PROCESS_LAUNCHER, **RENDEZVOUS}, True),  # --cpu (or distributed_type NO) with several processes/machines
    ({"ACCELERATE_USE_CPU": "False", **RENDEZVOUS}, True),  # single_gpu.yaml --num_processes 2
    (ONE_PROCESS_LAUNCHER, False),  # asked for one process, got one
    ({**ONE_PROCESS_LAUNCHER, **RENDEZVOUS, "WORLD_SIZE": "2"}, False),  # torchrun / accelerate's multi-process launchers
    ({**ONE_PROCESS_LAUNCHER, **RENDEZVOUS, "PMI_SIZE": "4"}, False),  # --mpirun_hostfile
    (RENDEZVOUS, False),  # plain `python train_lt.py` in a shell that exports a rendezvous
])
def test_launch_world_size_check(env, refused):
    from lt_utils.errors import UserError, check_launch_world_size

    if refused:
        with pytest.raises(UserError, match="started this process alone.*drop --cpu"):
            check_launch_world_size(env)
    else:
        check_launch_world_size(env)
