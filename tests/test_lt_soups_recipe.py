"""The LT-Soups recipe offline: train_lt.py ingredients on class-capped Fashion-MNIST-LT subsets (real images), the
branch and progressive soups, stage-2 head re-training from the soup; scripts/lt_soups.sh and its Slurm template."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import soup
import train_lt
from lt_utils.checkpoint import load_export, read_export_config
from lt_utils.soup import load_base_state
from tests.helpers_models import make_tiny_clip, random_pixels
from tests.helpers_soup import small_fashion_mnist
from tests.helpers_train import export_tensors

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    return {"root": root, "clip": make_tiny_clip(root / "clip"), "data": small_fashion_mnist(root / "fmnist", 30, 3)}


def run_flags(setup):
    """A seconds-long version of configs/ltsoups_stage*.yaml: 30-image n_max, 3 steps, no EMA (so 3 steps show), fp32 (CPU);
    the presets' test-slice split with 1 of the 3 test images per class as val."""
    return ["--data_dir", str(setup["data"]), "--max_per_class", "30", "--val_per_class", "1", "--max_train_steps", "3",
            "--min_train_steps", "0",
            "--total_batch_size", "16", "--per_device_eval_batch_size", "64", "--num_workers", "0",
            "--learning_rate", "1e-3", "--ema_decay", "0", "--mixed_precision", "no",
            "--cache_dir", str(setup["root"] / "hf_cache")]


def common_flags(setup):
    """Fashion-MNIST-LT at rho 10 and the tiny CLIP (its text tower gives every run the same head init)."""
    return ["--dataset", "fashion_mnist_lt", "--imb", "10", "--model_name_or_path", str(setup["clip"]), *run_flags(setup)]


def _weights(path):
    return export_tensors(path)


def test_recipe_soups_then_retrains_only_the_head(setup):
    root, flags = setup["root"] / "inproc", common_flags(setup)
    for k in (0, 1):  # balance factors 2^0, 2^1; two branches each: same subset, other seeds
        for branch in (0, 1):
            train_lt.main(["--config", str(REPO / "configs/ltsoups_stage1_full.yaml"), *flags,
                           "--balance_factor", str(2 ** k), "--subset_seed", str(k), "--loss", "ce" if k == 0 else "la",
                           "--seed", str(10 * k + branch), "--output_dir", str(root / f"k{k}_b{branch}")])
    for k in (0, 1):
        soup.main([str(root / f"k{k}_b0" / "final"), str(root / f"k{k}_b1" / "final"), "--output_dir", str(root / f"soup_k{k}")])
    soup.main([str(root / "soup_k0"), str(root / "soup_k1"), "--mode", "progressive", "--lam", "0.7",
               "--output_dir", str(root / "soup")])

    # the soup is 0.09 * zero-shot + 0.21 * mean(factor 1 branches) + 0.7 * mean(factor 2 branches)
    branches = [[_weights(root / f"k{k}_b{b}" / "final") for b in (0, 1)] for k in (0, 1)]
    anchor = load_base_state(read_export_config(root / "soup"))
    anchor["head.weight"] = load_file(str(root / "soup" / "head_init.safetensors"))["weight"]
    merged = _weights(root / "soup")
    assert set(merged) == set(branches[0][0]) and "backbone.encoder.layers.0.mlp.fc1.weight" in merged
    for key, value in merged.items():
        factor_means = [(b[0][key].double() + b[1][key].double()) / 2 for b in branches]
        want = 0.09 * anchor[key].double() + 0.21 * factor_means[0] + 0.7 * factor_means[1]
        torch.testing.assert_close(value.double(), want, rtol=0, atol=1e-6)
    assert not torch.equal(branches[0][0]["head.weight"], branches[0][1]["head.weight"])  # branches differ
    assert json.loads((root / "soup" / "soup_manifest.json").read_text())["weights"] == pytest.approx([0.21, 0.7])

    # stage 2: the head re-trained on the full LT data; every other tensor is the soup's
    train_lt.main(["--config", str(REPO / "configs/ltsoups_stage2_head.yaml"), *flags, "--head_scale", "30",
                   "--init_from", str(root / "soup"), "--output_dir", str(root / "stage2")])
    final = root / "stage2" / "final"
    stage2 = _weights(final)
    assert set(stage2) == set(merged)
    changed = sorted(k for k in merged if not torch.equal(stage2[k], merged[k]))
    assert changed == ["head.weight"]
    model, meta2 = load_export(final)
    assert meta2["method"] == "head" and model(random_pixels(2)).shape == (2, 10)
    assert "test" in json.loads((final / "metrics.json").read_text())


@pytest.mark.slow  # the shell script starts an interpreter per stage
def test_lt_soups_script_runs_the_recipe(setup):
    """The script with the presets' LT-Soups settings: exact subsets seeded by the factor's position, the test-slice
    split, 5 validations per run (10 steps: every 2nd), warm-up from 1e-6 x lr."""
    out = setup["root"] / "script"
    env = {**os.environ, "LAUNCH": "python", "PYTHON": "python", "DATASET": "fashion_mnist_lt", "IMB": "10",
           "MODEL": str(setup["clip"]), "FACTORS": "0 2", "BRANCHES": "1", "OUT": str(out), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    flags = [*run_flags(setup), "--max_train_steps", "10", "--head_scale", "30"]
    run = subprocess.run(["bash", "scripts/lt_soups.sh", "all", "--", *flags],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((out / "soup" / "soup_manifest.json").read_text())
    assert manifest["mode"] == "progressive" and manifest["weights"] == pytest.approx([0.21, 0.7])
    assert manifest["ingredients"] == [str(out / "stage1" / f"k{k}_branch0" / "best") for k in (0, 2)]
    assert json.loads((out / "stage2" / "final" / "config.json").read_text())["method"]["name"] == "head"
    counts = [int(30 * 0.1 ** (i / 9)) for i in range(10)]  # rho 10, n_max 30: n_min 3
    for position, k in enumerate((0, 2)):
        run_dir = out / "stage1" / f"k{k}_branch0"
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert (config["subset_selection"], config["subset_seed"], config["balance_factor"]) == ("lt_soups", position, 2 ** k)
        assert (config["warmup_start_factor"], config["ema_start"], config["num_evals"]) == (1e-6, "first_step", 5)
        assert f"Num examples = {sum(min(n, 3 * 2 ** k) for n in counts)}" in run.stderr
        info = json.loads((run_dir / "final" / "config.json").read_text())["lt_info"]
        assert info["val_source"] == "test_slice" and info["split_sizes"]["validation"] == 10 and info["split_sizes"]["test"] == 20
        assert [json.loads(line)["step"] for line in (run_dir / "log.txt").read_text().splitlines()] == [2, 4, 6, 8, 10]
    again = subprocess.run(["bash", "scripts/lt_soups.sh", "stage1"], cwd=REPO, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.count("skip") == 2


def test_slurm_template_submits_an_array_and_a_dependent_job(tmp_path):
    """sbatch cannot run here: a stand-in records its arguments and prints job ids like `sbatch --parsable`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.log"
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" "----" >> {log}\necho $((RANDOM + 1))\n')
    (bin_dir / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FACTORS": "0 1 2", "BRANCHES": "2",
           "OUT": str(tmp_path / "out")}
    run = subprocess.run(["bash", "scripts/lt_soups_slurm.sh", "--", "--mixed_precision", "bf16"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    array_call, final_call = [c.strip().splitlines() for c in log.read_text().split("----")[:2]]
    assert "--array=0-5" in array_call and "--export=ALL" in array_call
    assert any(a.startswith("--wrap=bash scripts/lt_soups.sh stage1 $SLURM_ARRAY_TASK_ID -- --mixed_precision bf16")
               for a in array_call)
    array_id = run.stdout.split("array job ")[1].split()[0]
    assert f"--dependency=afterok:{array_id}" in final_call
    assert any("lt_soups.sh soup && bash scripts/lt_soups.sh stage2" in a for a in final_call)


def test_slurm_template_runs_multi_node_tasks_through_the_multi_node_config(tmp_path):
    """NODES=2: each training task is one srun over its nodes, and on every node `accelerate launch` gets the shipped
    multi_node.yaml with that node's machine rank and the first node's address (checked by accelerate's own launcher
    validation); sbatch, srun, scontrol and accelerate are stand-ins that record what they were given."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    stand_ins = {"sbatch": 'echo 7', "scontrol": 'printf "gpu-a17\\ngpu-a18\\n"', "accelerate": 'exit 0'}
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f'#!/bin/bash\nprintf "%s\\n" {name} "$@" "----" >> {log}\n{body}\n')
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FACTORS": "0 1", "BRANCHES": "1", "NODES": "2",
           "GPUS": "8", "OUT": str(tmp_path / "out")}
    run = subprocess.run(["bash", "scripts/lt_soups_slurm.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    array_call, final_call = [c.strip().splitlines()[1:] for c in log.read_text().split("----")[:2]]
    for call in (array_call, final_call):
        assert "--nodes=2" in call and "--ntasks-per-node=1" in call
    assert "--wrap=srun bash scripts/lt_soups_slurm.sh node stage1 $SLURM_ARRAY_TASK_ID --" in array_call
    assert any(a.startswith("--wrap=bash scripts/lt_soups.sh soup && srun bash scripts/lt_soups_slurm.sh node stage2")
               for a in final_call)

    log.unlink()  # what srun then runs on the second node of job 12345
    node_env = {**env, "SLURM_JOB_NODELIST": "gpu-a[17-18]", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
                "SLURM_JOB_ID": "12345"}
    run = subprocess.run(["bash", "scripts/lt_soups_slurm.sh", "node", "stage1", "1"], cwd=REPO, env=node_env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    launch = next(c for c in log.read_text().split("----") if c.strip().startswith("accelerate")).strip().splitlines()
    assert launch[1] == "launch"
    script = launch.index("train_lt.py")
    assert "--balance_factor" in launch[script:]  # the stage-1 job's flags reach train_lt.py
    args = launch_command_parser().parse_args([str(REPO / a) if a.startswith("accelerate_configs/") else a
                                               for a in launch[2:script]] + ["train_lt.py"])
    args, _, _ = _validate_launch_command(args)
    prepare_multi_gpu_env(args)
    assert Path(args.config_file) == REPO / "accelerate_configs" / "multi_node.yaml"
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    assert args.rdzv_endpoint == f"gpu-a17:{20000 + 12345 % 20000}"
