"""--groups_from_imb: many / medium / few from a reference split's counts (LIFT reports CIFAR-100-LT rho 50 and 10 with
the rho = 100 split's groups), and both groupings reported where they differ."""
from collections import Counter

import pytest
import torch

from lt_utils.data.counts import lt_counts
from lt_utils.data.info import LTInfo
from lt_utils.errors import UserError
from lt_utils.metrics import compute_lt_metrics, with_split_groups


def cifar100_info(imb):
    counts = lt_counts(500, imb, 100)
    return LTInfo(dataset="cifar100_lt", class_names=[f"c{i}" for i in range(100)], train_counts=counts,
                  groups=["many"] * 100, imb=imb).with_thresholds(100, 20)


@pytest.mark.parametrize("imb,own", [(50, (41, 41, 18)), (10, (69, 31, 0)), (100, (35, 35, 30))])
def test_cifar100_groups_from_rho_100(imb, own):
    info = cifar100_info(imb)
    count = lambda groups: tuple(Counter(groups)[g] for g in ("many", "medium", "few"))
    assert count(info.groups) == own  # the split's own counts
    lift = info.with_groups_from_imb(100)
    assert count(lift.groups) == (35, 35, 30) and lift.groups_from_imb == 100.0  # LIFT's, at every rho
    assert count(lift.split_groups) == own and lift.train_counts == info.train_counts
    # thresholds still apply, to the reference counts
    assert count(lift.with_thresholds(50, 10).groups) == tuple(
        Counter("many" if n > 50 else "few" if n < 10 else "medium" for n in lt_counts(500, 100, 100))[g]
        for g in ("many", "medium", "few"))
    assert LTInfo.from_dict(lift.to_dict()).groups == lift.groups  # saved with exports (lt_info.json)


def test_both_groupings_reported_where_they_differ():
    info = cifar100_info(10).with_groups_from_imb(100)
    torch.manual_seed(0)
    labels = torch.arange(100).repeat(3)
    preds = torch.where(torch.rand(300) < torch.linspace(0.9, 0.2, 100).repeat(3), labels, (labels + 1) % 100)
    metrics = with_split_groups(compute_lt_metrics(preds, labels, 100, info.groups), info)
    own = compute_lt_metrics(preds, labels, 100, info.split_groups)
    assert (metrics["many_classes"], metrics["medium_classes"], metrics["few_classes"]) == (35, 35, 30)
    assert metrics["split_groups"] == {k: own[k] for k in metrics["split_groups"]}
    assert metrics["split_groups"]["few_acc"] is None and metrics["split_groups"]["few_classes"] == 0
    assert metrics["split_groups"]["many_acc"] == pytest.approx(own["many_acc"]) != metrics["many_acc"]
    same = cifar100_info(100).with_groups_from_imb(100)
    assert "split_groups" not in with_split_groups(compute_lt_metrics(preds, labels, 100, same.groups), same)


def test_groups_from_imb_refused_for_list_datasets_and_bad_ratios():
    listed = LTInfo(dataset="imagenet_lt", class_names=["a", "b"], train_counts=[5, 3], groups=["few", "few"])
    with pytest.raises(UserError, match="--groups_from_imb needs a dataset split by the rho rule"):
        listed.with_groups_from_imb(100)
    with pytest.raises(UserError, match="must be >= 1"):
        cifar100_info(10).with_groups_from_imb(0.5)
    assert listed.with_groups_from_imb(None) is listed


def test_lift_presets_set_lift_fidelity_flags():
    from pathlib import Path

    from lt_utils.config import build_train_parser, parse_args_with_config

    presets = sorted(Path(__file__).resolve().parents[1].glob("configs/lift_*.yaml"))
    assert len(presets) >= 5
    for preset in presets:
        args = parse_args_with_config(build_train_parser(), ["--config", str(preset)])
        assert (args.interpolation, args.mixed_precision) == ("bilinear", "fp16"), preset.name
        assert args.groups_from_imb == (100.0 if args.dataset == "cifar100_lt" else None), preset.name
