"""Learning behaviour on real data: on Fashion-MNIST-LT (the Debian IDX files, n_max 600, rho 100) a tiny ViT
trained from scratch with the logit-adjusted loss, or with class-balanced re-weighting (CB), reaches far higher few-shot
accuracy than with plain CE."""
import json

import pytest
import torch

from helpers_cli import run_cli
from helpers_train import REPO, TINY_VIT
from lt_utils.data import load_lt_dataset

pytestmark = pytest.mark.slow  # minutes of training to a learning outcome

FMNIST = ["--dataset", "fashion_mnist_lt", "--imb", "100", "--max_per_class", "600"]


def train(out, loss, cache_dir):
    # the quick-start recipe, on 2,000 seeded test images instead of 10,000 to keep it short
    result = run_cli("train_lt.py", "--config", "configs/quickstart_fashion_mnist.yaml", *FMNIST,
                     "--model_name_or_path", TINY_VIT, "--loss", loss, "--output_dir", out, "--max_eval_samples", "2000",
                     "--cache_dir", cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    # build the split once, then the three runs (in this process, one after the other: the other test worker has the
    # second core)
    load_lt_dataset("fashion_mnist_lt", imb=100, max_per_class=600, cache_dir=root / "hf_cache")
    results = {}
    for loss in ("ce", "la", "cb"):
        train(root / loss, loss, root / "hf_cache")
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
    result = run_cli("train_lt.py", *args, *LOS_DATA, "--output_dir", out, "--cache_dir", cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "all_results.json").read_text())


@pytest.fixture(scope="module")
def los_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("los")
    cache = root / "hf_cache"
    stage1 = los_run(["--config", "configs/los_cifar100_stage1.yaml", "--model_name_or_path", str(RESNET8),
                      "--num_train_epochs", "3", "--learning_rate", "0.1", "--weight_decay", "5e-4"], root / "stage1", cache)
    # stage 2 at a higher lr than LOS's 5e-4 so that 2 epochs move the head
    stage2 = {ls: los_run(["--config", "configs/los_cifar100_stage2.yaml", "--init_from", str(root / "stage1" / "final"),
                           "--label_smoothing", ls, "--num_train_epochs", "2", "--learning_rate", "0.05"], root / ls, cache)
              for ls in ("0.0", "0.98")}
    return root, stage1, stage2


def test_los_stage1_then_stage2_end_to_end(los_runs):
    from helpers_train import export_tensors

    root, stage1, stage2 = los_runs
    # LOS's protocol: the epoch that tests best is the paper's row, best/ on val beside it; flip TTE
    assert set(stage1) == {"best", "final", "best_test", "protocol", "paper_row"} and stage1["final"]["tte"] == "flip"
    assert (stage1["protocol"], stage1["paper_row"], stage1["best_test"]["selected_on"]) == ("best_test", "best_test", "test")
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
