"""Losses against hand-computed values: CE, label smoothing / LOS over-smoothing, logit adjustment, balanced softmax,
and LIFT's focal, LDAM, CB, GRW and LADE against their published formulas in NumPy (float64) on random logits."""
import math
import re

import numpy as np
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
    assert {"ce", "la", "balanced_softmax", "focal", "ldam", "cb", "grw", "lade"} <= set(LOSSES.names())
    with pytest.raises(UserError, match=re.escape(f"unknown loss 'ldam2'; choose one of {', '.join(LOSSES.names())}")):
        build_loss("ldam2")
    for name in ("la", "balanced_softmax", "ldam", "cb", "grw", "lade"):
        with pytest.raises(UserError, match="train counts"):
            build_loss(name)
    with pytest.raises(UserError, match="positive train count"):
        build_loss("la", train_counts=[3, 0, 1])
    with pytest.raises(UserError, match="label_smoothing"):
        build_loss("ce", label_smoothing=1.5)
    with pytest.raises(UserError, match="--label_smoothing does not apply to --loss cb"):
        build_loss("cb", COUNTS, label_smoothing=0.1)
    with pytest.raises(UserError, match="--cb_beta must be in"):
        build_loss("cb", COUNTS, cb_beta=1.0)
    with pytest.raises(UserError, match="--focal_gamma must be >= 0"):
        build_loss("focal", focal_gamma=-1)


# ------------------------------------------------------------------ LIFT's menu against the published formulas
C, N = 7, 64
RNG = np.random.default_rng(0)
Z = RNG.normal(scale=3.0, size=(N, C))
Y = np.concatenate([np.arange(C - 1), RNG.integers(0, C - 1, size=N - C + 1)])  # class C-1 absent from the batch
COUNTS_C = np.array([500, 230, 100, 47, 20, 9, 4])


def _np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _np_ce_terms(z, y):
    return -_np_log_softmax(z)[np.arange(len(y)), y]


def _ours(name, **options):
    loss = build_loss(name, COUNTS_C.tolist(), **options)
    return loss(torch.tensor(Z, dtype=torch.float32), torch.tensor(Y)).item()


@pytest.mark.parametrize("gamma", [0.0, 2.0, 0.5])
def test_focal_equals_formula(gamma):
    # Lin et al.: FL = -(1 - p_t)^gamma log p_t, averaged; gamma 0 is CE
    p_t = np.exp(_np_log_softmax(Z)[np.arange(N), Y])
    expected = np.mean(-((1 - p_t) ** gamma) * np.log(p_t))
    assert _ours("focal", focal_gamma=gamma) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("max_m,scale", [(0.5, 30.0), (0.3, 25.0)])
def test_ldam_equals_formula(max_m, scale):
    # Cao et al.: Delta_c = K / n_c^(1/4), K so that max Delta = max_m; CE(s * (x_y - Delta_y)) with s*x the logits
    delta = COUNTS_C ** -0.25
    delta = delta * max_m / delta.max()
    z = Z.copy()
    z[np.arange(N), Y] -= scale * delta[Y]
    expected = _np_ce_terms(z, Y).mean()
    assert _ours("ldam", ldam_max_margin=max_m, scale=scale) == pytest.approx(expected, rel=1e-5)
    assert delta[-1] == pytest.approx(max_m) and delta[0] < delta[-1]


def _weighted_ce(weights):
    terms = _np_ce_terms(Z, Y)
    return float((weights[Y] * terms).sum() / weights[Y].sum())


@pytest.mark.parametrize("beta", [0.9999, 0.99, 0.0])
def test_class_balanced_equals_formula(beta):
    # Cui et al.: weight 1 / E_n with E_n = (1 - beta^n) / (1 - beta); beta 0 is CE
    effective = (1 - beta ** COUNTS_C.astype(float)) / (1 - beta)
    assert _ours("cb", cb_beta=beta) == pytest.approx(_weighted_ce(1 / effective), rel=1e-5)
    if beta == 0.0:
        assert _ours("cb", cb_beta=beta) == pytest.approx(_np_ce_terms(Z, Y).mean(), rel=1e-5)


@pytest.mark.parametrize("exponent", [1.0, 0.5])
def test_grw_equals_formula(exponent):
    # generalised re-weighting: weight (n_c / N)^-p; p = 1 is inverse frequency
    ratio = COUNTS_C / COUNTS_C.sum()
    assert _ours("grw", grw_exponent=exponent) == pytest.approx(_weighted_ce(ratio ** -exponent), rel=1e-5)


@pytest.mark.parametrize("lam,alpha", [(0.1, 0.1), (0.5, 1.0)])
def test_lade_equals_formula(lam, alpha):
    # Hong et al.: L = CE(z + log p_s) + alpha * L_LADER, L_LADER = -sum_y p_s(y) [ mean_{x|y} z_y(x)
    #   - log mean_x exp(z_y(x) - log p_s(y) + log p_t(y)) - lam * (that log)^2 ], p_t = 1/C, per class, in the batch
    prior = COUNTS_C / COUNTS_C.sum()
    ce = _np_ce_terms(Z + np.log(prior), Y).mean()
    lader = 0.0
    for y in range(C):
        in_class = Z[Y == y, y]
        first = in_class.mean() if len(in_class) else 0.0
        shifted = Z[:, y] - np.log(prior[y]) + np.log(1.0 / C)
        second = np.log(np.mean(np.exp(shifted)))
        lader -= prior[y] * (first - second - lam * second ** 2)
    assert _ours("lade", lade_lambda=lam, lade_weight=alpha) == pytest.approx(ce + alpha * lader, rel=1e-5)


def test_menu_losses_run_on_the_logits_device_and_dtype():
    # LIFT's LDAM is CUDA-only; here every prior is a buffer that moves with .to(...), and half logits are upcast
    for name in ("focal", "ldam", "cb", "grw", "lade"):
        loss = build_loss(name, COUNTS_C.tolist()).to(torch.float64)
        assert all(b.dtype == torch.float64 for b in loss.buffers())
        value = build_loss(name, COUNTS_C.tolist())(torch.tensor(Z).bfloat16(), torch.tensor(Y))
        assert value.dtype == torch.float32 and torch.isfinite(value)
