"""Learning behaviour on real data: on Fashion-MNIST-LT (the Debian IDX files, n_max 600, rho 100) a tiny ViT
trained from scratch with the logit-adjusted loss, or with class-balanced re-weighting (CB), reaches far higher few-shot
accuracy than with plain CE."""
import json
import os
import subprocess
import sys

import pytest

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
