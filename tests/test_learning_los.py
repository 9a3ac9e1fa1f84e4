"""Learning behaviour of LOS on real data (Fashion-MNIST-LT, the Debian IDX files, n_max 600, rho 100): its stage-1
preset, then its stage-2 preset with over-smoothed labels, which lifts few-shot accuracy over plain CE."""
import json

import pytest
import torch

from helpers_cli import run_cli
from helpers_train import REPO

pytestmark = pytest.mark.slow  # minutes of training to a learning outcome

FMNIST = ["--dataset", "fashion_mnist_lt", "--imb", "100", "--max_per_class", "600"]


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
