"""Losses against hand-computed values: CE, label smoothing / LOS over-smoothing, logit adjustment, balanced softmax."""
import math

import pytest
import torch

from lt_utils.errors import UserError
from lt_utils.losses import LOSSES, build_loss

LOGITS = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
LABELS = torch.tensor([0, 2])
COUNTS = [10, 5, 1]


def _ce(rows, labels):
    """Mean of -log softmax(row)[y], in plain Python."""
    total = 0.0
    for row, y in zip(rows, labels):
        total += -row[y] + math.log(sum(math.exp(v) for v in row))
    return total / len(rows)


def test_plain_ce():
    expected = _ce(LOGITS.tolist(), LABELS.tolist())
    assert build_loss("ce")(LOGITS, LABELS).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_logit_adjusted_offset(tau):
    prior = [c / sum(COUNTS) for c in COUNTS]
    adjusted = [[v + tau * math.log(p) for v, p in zip(row, prior)] for row in LOGITS.tolist()]
    loss = build_loss("la", train_counts=COUNTS, tau=tau)
    assert loss(LOGITS, LABELS).item() == pytest.approx(_ce(adjusted, LABELS.tolist()), rel=1e-6)
    assert loss(LOGITS, LABELS).item() != pytest.approx(_ce(LOGITS.tolist(), LABELS.tolist()), rel=1e-3)


def test_la_equals_balanced_softmax_at_tau_1():
    la = build_loss("la", train_counts=COUNTS, tau=1.0)(LOGITS, LABELS)
    bs = build_loss("balanced_softmax", train_counts=COUNTS)(LOGITS, LABELS)
    bs_tau_ignored = build_loss("balanced_softmax", train_counts=COUNTS, tau=3.0)(LOGITS, LABELS)
    assert la.item() == pytest.approx(bs.item(), rel=1e-7) == pytest.approx(bs_tau_ignored.item(), rel=1e-7)


def test_prior_is_a_buffer_and_logits_stay_raw():
    loss = build_loss("la", train_counts=torch.tensor(COUNTS))
    buffers = dict(loss.named_buffers())
    torch.testing.assert_close(buffers["log_prior"], torch.tensor([10 / 16, 5 / 16, 1 / 16]).log())
    logits = LOGITS.clone()
    loss(logits, LABELS)
    assert torch.equal(logits, LOGITS)  # the offset is added inside the loss only
    assert loss.to(torch.float64).log_prior.dtype == torch.float64  # moves with .to(...)


def test_los_over_smoothing_targets_k100():
    eps, k = 0.98, 100
    true_target, other_target = (1 - eps) + eps / k, eps / k
    assert (round(true_target, 6), round(other_target, 6)) == (0.0298, 0.0098)
    logits = torch.randn(4, k, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 5, 99, 42])
    target = torch.full((4, k), other_target)
    target[torch.arange(4), labels] = true_target
    expected = -(target * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(build_loss("ce", label_smoothing=eps)(logits, labels), expected)


def test_label_smoothing_with_logit_adjustment():
    eps = 0.1
    prior = torch.tensor(COUNTS, dtype=torch.float32) / sum(COUNTS)
    adjusted = LOGITS + prior.log()
    target = torch.full((2, 3), eps / 3)
    target[torch.arange(2), LABELS] += 1 - eps
    expected = -(target * adjusted.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(build_loss("la", COUNTS, label_smoothing=eps)(LOGITS, LABELS), expected)


def test_bf16_logits_computed_in_fp32():
    loss = build_loss("la", COUNTS)(LOGITS.bfloat16(), LABELS)
    assert loss.dtype == torch.float32


def test_bad_inputs():
    assert LOSSES.names() == ["ce", "la", "balanced_softmax"]
    with pytest.raises(UserError, match="unknown loss 'focal'"):
        build_loss("focal")
    for name in ("la", "balanced_softmax"):
        with pytest.raises(UserError, match="train counts"):
            build_loss(name)
    with pytest.raises(UserError, match="positive train count"):
        build_loss("la", train_counts=[3, 0, 1])
    with pytest.raises(UserError, match="label_smoothing"):
        build_loss("ce", label_smoothing=1.5)
