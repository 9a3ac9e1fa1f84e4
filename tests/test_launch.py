"""The shipped accelerate configs through the real `accelerate launch` CLI from outside the repository, as they are
(bf16; one CPU process, a few steps): single_gpu.yaml and ds_zero3.yaml here; multi_gpu.yaml and multi_node.yaml
with 2 processes in test_distributed.py, ds_zero2.yaml and ds_zero3.yaml with 2 in test_deepspeed.py (fp32, equal to
one process). Also: the multi-node config through accelerate's own validation; `--cpu` with a multi-process config
refused; secrets never recorded, each log line once, test metrics in the tracker."""
import json
from pathlib import Path

import pytest
import torch

from helpers_distributed import accelerate_launch
from helpers_models import make_tiny_clip
from helpers_train import REPO, tiny_train_args

pytestmark = pytest.mark.slow  # accelerate launch: two interpreters per test

CONFIGS = REPO / "accelerate_configs"
SECRET = "hf_SECRETtoken0123456789"
STEPS = ["--max_train_steps", "2", "--eval_steps", "1", "--per_device_train_batch_size", "8"]


def launch(config, out, idx_dir, *extra, launch_flags=("--num_processes", "1"), ok=True):
    """`accelerate launch --config_file CONFIG --num_processes 1 [flags] train_lt.py ...` as the README shows it (the
    one-process override is the only change)."""
    res = accelerate_launch(config, [*tiny_train_args(idx_dir, out), *STEPS, *extra], *launch_flags, cwd=Path(out).parent)
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


def test_ds_zero3_yaml_exports_a_complete_lora_adapter(idx_dir, tmp_path):
    """The README's ZeRO command (bf16 from the yaml, accumulation from train_lt.py's flag), its DeepSpeed settings
    inline in the yaml, with LoRA on a tiny CLIP: ZeRO-3 partitions every parameter, so an export without the 16-bit
    gather would hold empty tensors."""
    from safetensors.torch import load_file

    from lt_utils.checkpoint import load_export

    clip = make_tiny_clip(tmp_path / "clip", image_size=28, patch_size=4)
    out = tmp_path / "zero3"
    res = launch("ds_zero3.yaml", out, idx_dir, "--total_batch_size", "16", "--gradient_accumulation_steps", "2",
                 "--checkpointing_steps", "1", "--model_name_or_path", clip, "--method", "lora", "--from_scratch",
                 "false", "--head_init", "text")
    assert "Processes = 1 (DEEPSPEED), mixed precision = bf16" in res.stderr  # the yaml's bf16
    shards = sorted(p.name for p in (out / "step_1" / "pytorch_model").iterdir())
    assert any(name.startswith("bf16_zero_pp_rank_0") for name in shards), shards  # ZeRO optimizer shards in bf16
    assert json.loads((out / "all_results.json").read_text())["final"]["test"]["num_samples"] > 0
    adapter = load_file(out / "final" / "adapter" / "adapter_model.safetensors")
    lora = {k: v for k, v in adapter.items() if "lora_" in k}
    # r = 2 (bottleneck rule: 10 classes, 2 layers), q_proj and v_proj of 2 layers, hidden 32; cosine head 10 x 32
    assert sum(v.numel() for v in lora.values()) == 2 * 2 * (2 * 32 + 32 * 2)
    assert json.loads((out / "final" / "adapter" / "adapter_config.json").read_text())["r"] == 2
    assert load_file(out / "final" / "adapter" / "head.safetensors")["weight"].numel() == 10 * 32
    assert all(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # trained: B starts at zero
    model, _ = load_export(out / "final")
    with torch.no_grad():
        assert torch.isfinite(model(torch.zeros(2, 3, 28, 28))).all()


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
