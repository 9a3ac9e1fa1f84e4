"""Training losses for long-tailed data. Every loss is module(logits, labels) -> scalar mean loss.

ce (with label smoothing / LOS over-smoothing), la (logit adjustment), balanced_softmax, and LIFT's menu of
re-weighting / margin losses: focal, ldam, cb, grw, lade. Defaults are LIFT's (utils/losses.py); LDAM runs without
deferred re-weighting, as in LIFT.
"""
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from .axes import LOSSES  # the --loss names; their builders are the functions below
from .errors import UserError


@dataclasses.dataclass
class LossOptions:
    """The flags that shape a loss (LIFT's defaults); a builder reads the ones it needs."""

    tau: float = 1.0  # la
    label_smoothing: float = 0.0  # ce, la, balanced_softmax
    focal_gamma: float = 2.0  # focal
    ldam_max_margin: float = 0.5  # ldam: the rarest class's margin, before the scale
    scale: float = 30.0  # ldam: the head's logit scale (train_lt.py passes --head_scale)
    cb_beta: float = 0.9999  # cb
    grw_exponent: float = 1.0  # grw
    lade_lambda: float = 0.1  # lade: ReMINE regulariser
    lade_weight: float = 0.1  # lade: weight of the LADER estimation loss

    @classmethod
    def from_spec(cls, loss, head_scale):
        """From a run's spec.LossSpec; the head's scale becomes LDAM's."""
        names = {f.name for f in dataclasses.fields(cls)} - {"scale"}
        return cls(scale=head_scale, **{n: getattr(loss, n) for n in names})


class CrossEntropy(nn.Module):
    """CE against (1 - eps) * one_hot + eps / K. LOS stage 2 uses eps 0.98 (K=100: 0.0298 true, 0.0098 other)."""

    def __init__(self, label_smoothing=0.0):
        super().__init__()
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits, labels):
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)


class LogitAdjustedCrossEntropy(CrossEntropy):
    """CE(logits + tau * log(prior), y). The offset lives in the loss only: test-time logits stay raw (balanced)."""

    def __init__(self, train_counts, tau=1.0, label_smoothing=0.0):
        super().__init__(label_smoothing)
        self.tau = float(tau)
        self.register_buffer("log_prior", log_prior(train_counts))

    def forward(self, logits, labels):
        return super().forward(logits.float() + self.tau * self.log_prior, labels)


class FocalLoss(nn.Module):
    """Lin et al. 2017: mean over samples of -(1 - p_y)^gamma log p_y."""

    def __init__(self, gamma=2.0):
        super().__init__()
        self.gamma = float(gamma)

    def forward(self, logits, labels):
        ce = F.cross_entropy(logits.float(), labels, reduction="none")
        return ((1 - torch.exp(-ce)) ** self.gamma * ce).mean()


class LDAMLoss(nn.Module):
    """Cao et al. 2019: CE after subtracting scale * m_y from the true class's logit, m_c ∝ n_c^(-1/4), max m = max_m.

    The head's logits are already scaled, so only the margin is multiplied by the scale (as LIFT does)."""

    def __init__(self, train_counts, max_margin=0.5, scale=30.0):
        super().__init__()
        margins = _counts(train_counts) ** -0.25
        self.register_buffer("margins", (margins * (max_margin / margins.max())).float())
        self.scale = float(scale)

    def forward(self, logits, labels):
        logits = logits.float()
        shift = torch.zeros_like(logits).scatter_(1, labels[:, None], (self.scale * self.margins[labels])[:, None])
        return F.cross_entropy(logits - shift, labels)


class WeightedCrossEntropy(nn.Module):
    """CE with per-class weights (normalised to mean 1), reduced as torch does: sum w_y * l / sum w_y."""

    def __init__(self, class_weights):
        super().__init__()
        self.register_buffer("class_weights", (class_weights / class_weights.mean()).float())

    def forward(self, logits, labels):
        return F.cross_entropy(logits.float(), labels, weight=self.class_weights)


class LADELoss(nn.Module):
    """Hong et al. 2021: PC-softmax CE (logit + log prior) + weight * LADER, the ReMINE estimate of log p_t(y|x)
    with the balanced target prior; per-class terms weighted by the train prior (LIFT's and the paper's code)."""

    def __init__(self, train_counts, remine_lambda=0.1, estimate_weight=0.1):
        super().__init__()
        self.register_buffer("log_prior", log_prior(train_counts))
        self.remine_lambda, self.estimate_weight = float(remine_lambda), float(estimate_weight)

    def forward(self, logits, labels):
        logits = logits.float()
        num_classes, batch = logits.shape[1], logits.shape[0]
        ce = F.cross_entropy(logits + self.log_prior, labels)
        onehot = F.one_hot(labels, num_classes).float()  # [N, C]
        per_class = onehot.sum(0)
        # E_{x ~ p(x|y)} f_y(x) over the batch's samples of each class (0 for a class absent from the batch)
        first = (logits * onehot).sum(0) / (per_class + 1e-8)
        # log E_{x ~ p(x)} exp(f_y(x) - log p_s(y) + log p_t(y)), p_t uniform
        second = torch.logsumexp(logits - self.log_prior - math.log(num_classes), dim=0) - math.log(batch)
        bound = first - second - self.remine_lambda * second ** 2
        return ce - self.estimate_weight * (bound * self.log_prior.exp()).sum()


def _counts(train_counts):
    counts = torch.as_tensor(train_counts, dtype=torch.float64).flatten()
    if counts.numel() == 0 or (counts <= 0).any():
        raise UserError("logit-adjusted losses need a positive train count for every class; check cls_num_list")
    return counts


def log_prior(train_counts):
    """log(n_c / N) as float32; every class needs at least one training image."""
    counts = _counts(train_counts)
    return (counts / counts.sum()).log().float()


def _needs_counts(name, train_counts):
    if train_counts is None:
        raise UserError(f"loss {name!r} needs the per-class train counts (priors); use --loss ce otherwise")


def _cross_entropy(train_counts, o):
    return CrossEntropy(o.label_smoothing)


def _logit_adjusted(train_counts, o):
    _needs_counts("la", train_counts)
    return LogitAdjustedCrossEntropy(train_counts, o.tau, o.label_smoothing)


def _balanced_softmax(train_counts, o):
    _needs_counts("balanced_softmax", train_counts)
    return LogitAdjustedCrossEntropy(train_counts, 1.0, o.label_smoothing)  # logit adjustment with tau = 1


def _focal(train_counts, o):
    _no_smoothing("focal", o)
    _check(o.focal_gamma >= 0, f"--focal_gamma must be >= 0, got {o.focal_gamma}")
    return FocalLoss(o.focal_gamma)


def _ldam(train_counts, o):
    _needs_counts("ldam", train_counts)
    _no_smoothing("ldam", o)
    _check(o.ldam_max_margin > 0, f"--ldam_max_margin must be > 0, got {o.ldam_max_margin}")
    return LDAMLoss(train_counts, o.ldam_max_margin, o.scale)


def _class_balanced(train_counts, o):
    """Cui et al. 2019: weights (1 - beta) / (1 - beta^n_c), the inverse effective number of samples."""
    _needs_counts("cb", train_counts)
    _no_smoothing("cb", o)
    _check(0 <= o.cb_beta < 1, f"--cb_beta must be in [0, 1), got {o.cb_beta}")
    return WeightedCrossEntropy((1 - o.cb_beta) / (1 - o.cb_beta ** _counts(train_counts)))


def _generalized_reweight(train_counts, o):
    """Zhai et al. 2021 (generalised re-weighting): weights (n_c / N)^(-exponent)."""
    _needs_counts("grw", train_counts)
    _no_smoothing("grw", o)
    counts = _counts(train_counts)
    return WeightedCrossEntropy((counts / counts.sum()) ** -o.grw_exponent)


def _lade(train_counts, o):
    _needs_counts("lade", train_counts)
    _no_smoothing("lade", o)
    return LADELoss(train_counts, o.lade_lambda, o.lade_weight)


def _no_smoothing(name, o):
    _check(not o.label_smoothing, f"--label_smoothing does not apply to --loss {name}; use ce, la or balanced_softmax")


def _check(ok, message):
    if not ok:
        raise UserError(f"{message}; see train_lt.py --help")


def build_loss(name, train_counts=None, options=None, **fields):
    """LOSSES[name](train_counts, options), options a LossOptions (or its fields as keywords)."""
    builder = LOSSES.get(name)
    o = options or LossOptions(**fields)
    if not 0.0 <= float(o.label_smoothing) <= 1.0:
        raise UserError(f"label_smoothing must be in [0, 1], got {o.label_smoothing}")
    return builder(train_counts, o)
