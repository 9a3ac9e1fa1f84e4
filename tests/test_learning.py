"""Learning behaviour on real data: on Fashion-MNIST-LT (the Debian IDX files, n_max 600, rho 100) a tiny ViT
trained from scratch with the logit-adjusted loss reaches far higher few-shot accuracy than with plain CE."""
import json

import pytest

from helpers_train import TINY_VIT, python_script

FMNIST = ["--dataset", "fashion_mnist_lt", "--imb", "100", "--max_per_class", "600"]


def train(out, loss, cache_dir):
    # the quick-start recipe, shortened: 2,000 seeded test images instead of 10,000 keep it to seconds
    result = python_script("train_lt.py", "--config", "configs/quickstart_fashion_mnist.yaml", *FMNIST,
                           "--model_name_or_path", TINY_VIT, "--loss", loss, "--output_dir", out,
                           "--max_eval_samples", "2000", "--cache_dir", cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "final" / "metrics.json").read_text())["test"]


@pytest.fixture(scope="module")
def ce_and_la(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    return train(root / "ce", "ce", root / "hf_cache"), train(root / "la", "la", root / "hf_cache")


def test_logit_adjustment_lifts_few_shot_accuracy(ce_and_la):
    ce, la = ce_and_la
    assert (ce["many_classes"], ce["medium_classes"], ce["few_classes"]) == (4, 3, 3)
    assert ce["few_acc"] < 10  # CE on rho=100 data all but ignores the three rarest classes
    assert la["few_acc"] > 40
    assert la["mean_class_acc"] > ce["mean_class_acc"]
    assert ce["many_acc"] > la["many_acc"]  # the price: head classes lose some accuracy
