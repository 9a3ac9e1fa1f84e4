"""Learning behaviour on real data: on Fashion-MNIST-LT (the Debian IDX files, n_max 600, rho 100) a tiny ViT
trained from scratch with the logit-adjusted loss, or with class-balanced re-weighting (CB), reaches far higher few-shot
accuracy than with plain CE."""
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers_train import QUIET_ENV, REPO, TINY_VIT
from lt_utils.data import load_lt_dataset

FMNIST = ["--dataset", "fashion_mnist_lt", "--imb", "100", "--max_per_class", "600"]


def start_training(out, loss, cache_dir):
    # the quick-start recipe, on 2,000 seeded test images instead of 10,000 to keep it short
    return subprocess.Popen(
        [sys.executable, "train_lt.py", "--config", "configs/quickstart_fashion_mnist.yaml", *FMNIST,
         "--model_name_or_path", str(TINY_VIT), "--loss", loss, "--output_dir", str(out), "--max_eval_samples", "2000",
         "--cache_dir", str(cache_dir)],
        cwd=REPO, env={**os.environ, **QUIET_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    # build the split once, then train the three runs side by side (one thread each)
    load_lt_dataset("fashion_mnist_lt", imb=100, max_per_class=600, cache_dir=root / "hf_cache")
    procs = {loss: start_training(root / loss, loss, root / "hf_cache") for loss in ("ce", "la", "cb")}
    results = {}
    for loss, proc in procs.items():
        _, err = proc.communicate(timeout=1800)  # three runs share the cores
        assert proc.returncode == 0, err[-3000:]
        results[loss] = json.loads((root / loss / "final" / "metrics.json").read_text())["test"]
    return results


def test_logit_adjustment_lifts_few_shot_accuracy(runs):
    ce, la = runs["ce"], runs["la"]
    assert (ce["many_classes"], ce["medium_classes"], ce["few_classes"]) == (4, 3, 3)
    assert ce["few_acc"] < 10  # CE on rho=100 data all but ignores the three rarest classes
    assert la["few_acc"] > 40
    assert la["mean_class_acc"] > ce["mean_class_acc"]
    assert ce["many_acc"] > la["many_acc"]  # the price: head classes lose some accuracy


def test_class_balanced_reweighting_lifts_few_shot_accuracy(runs):
    # CB (beta 0.9999, LIFT's default) weights a 6-image class ~97x a 600-image one; measured: few 46.98 vs CE < 10
    ce, cb = runs["ce"], runs["cb"]
    assert cb["few_acc"] > 30 and cb["few_acc"] > ce["few_acc"] + 25
    assert cb["mean_class_acc"] > ce["mean_class_acc"]


# LOS on Fashion-MNIST-LT: its stage-1 preset (a small CIFAR ResNet from scratch, few epochs), then its stage-2 preset
# (augmented images through the frozen backbone, BatchNorm in train mode) with over-smoothed labels vs plain CE
LOS_DATA = [*FMNIST, "--max_eval_samples", "1000", "--per_device_eval_batch_size", "500", "--num_workers", "0"]
RESNET8 = REPO / "configs" / "models" / "cifar_resnet8"


def los_run(args, out, cache_dir):
    return subprocess.Popen([sys.executable, "train_lt.py", *args, *LOS_DATA, "--output_dir", str(out),
                             "--cache_dir", str(cache_dir)],
                            cwd=REPO, env={**os.environ, **QUIET_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def finish(proc, out):
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    return json.loads((out / "all_results.json").read_text())


@pytest.fixture(scope="module")
def los_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("los")
    cache = root / "hf_cache"
    stage1 = finish(los_run(["--config", "configs/los_cifar100_stage1.yaml", "--model_name_or_path", str(RESNET8),
                             "--num_train_epochs", "3", "--learning_rate", "0.1", "--weight_decay", "5e-4"],
                            root / "stage1", cache), root / "stage1")
    # stage 2 at a higher lr than LOS's 5e-4 so that 2 epochs move the head
    runs = {ls: los_run(["--config", "configs/los_cifar100_stage2.yaml", "--init_from", str(root / "stage1" / "final"),
                         "--label_smoothing", ls, "--num_train_epochs", "2", "--learning_rate", "0.05"], root / ls, cache)
            for ls in ("0.0", "0.98")}
    stage2 = {ls: finish(proc, root / ls) for ls, proc in runs.items()}
    return root, stage1, stage2


def test_los_stage1_then_stage2_end_to_end(los_runs):
    from helpers_train import export_tensors

    root, stage1, stage2 = los_runs
    assert set(stage1) == {"final"} and stage1["final"]["tte"] == "flip"  # the final epoch is reported, flip TTE
    config = json.loads((root / "stage1" / "final" / "config.json").read_text())
    assert (config["backbone_spec"]["kind"], config["head_type"], config["lt_info"]["selection"]) == \
        ("cifar_resnet", "linear", "first")
    s1 = export_tensors(root / "stage1" / "final")
    s2 = export_tensors(root / "0.98" / "final")
    assert torch.equal(s1["backbone.conv1.weight"], s2["backbone.conv1.weight"])  # the backbone is frozen
    assert not torch.equal(s1["backbone.bn1.running_mean"], s2["backbone.bn1.running_mean"])  # BN in train mode
    assert s2["backbone.bn1.num_batches_tracked"] > s1["backbone.bn1.num_batches_tracked"]
    assert not torch.equal(s1["head.bias"], s2["head.bias"])


def test_over_smoothed_labels_reduce_head_bias(los_runs):
    _, _, stage2 = los_runs
    ce, los = stage2["0.0"]["final"]["test"], stage2["0.98"]["final"]["test"]
    print({name: {k: r[k] for k in ("many_acc", "medium_acc", "few_acc", "mean_class_acc")} for name, r in (("ce", ce), ("los", los))})
    assert (ce["many_classes"], ce["medium_classes"], ce["few_classes"]) == (4, 3, 3)
    assert los["few_acc"] > ce["few_acc"] + 10  # the tail gains
    assert los["many_acc"] - los["few_acc"] < ce["many_acc"] - ce["few_acc"]  # a smaller head-tail gap
