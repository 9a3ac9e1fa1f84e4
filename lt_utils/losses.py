"""Training losses for long-tailed data: CE (with label smoothing / LOS over-smoothing), logit adjustment,
balanced softmax. All are module(logits, labels) -> scalar mean loss."""
import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .registry import Registry

# `--loss`: builders f(train_counts, tau=..., label_smoothing=...) -> module(logits, labels) -> scalar
LOSSES = Registry("loss")


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


def log_prior(train_counts):
    """log(n_c / N) as float32; every class needs at least one training image."""
    counts = torch.as_tensor(train_counts, dtype=torch.float64).flatten()
    if counts.numel() == 0 or (counts <= 0).any():
        raise UserError("logit-adjusted losses need a positive train count for every class; check cls_num_list")
    return (counts / counts.sum()).log().float()


def _needs_counts(name, train_counts):
    if train_counts is None:
        raise UserError(f"loss {name!r} needs the per-class train counts (priors); use --loss ce otherwise")


@LOSSES.register("ce")
def _cross_entropy(train_counts, tau=1.0, label_smoothing=0.0):
    return CrossEntropy(label_smoothing)


@LOSSES.register("la")
def _logit_adjusted(train_counts, tau=1.0, label_smoothing=0.0):
    _needs_counts("la", train_counts)
    return LogitAdjustedCrossEntropy(train_counts, tau, label_smoothing)


@LOSSES.register("balanced_softmax")
def _balanced_softmax(train_counts, tau=1.0, label_smoothing=0.0):
    _needs_counts("balanced_softmax", train_counts)
    return LogitAdjustedCrossEntropy(train_counts, 1.0, label_smoothing)  # logit adjustment with tau = 1


def build_loss(name, train_counts=None, tau=1.0, label_smoothing=0.0):
    builder = LOSSES.get(name)
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise UserError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    return builder(train_counts, tau=tau, label_smoothing=label_smoothing)
