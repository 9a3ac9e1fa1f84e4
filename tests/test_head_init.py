"""LIFT's head initialisations beyond text and class means: the class-balanced linear probe (torch L-BFGS, checked
against the optimality condition of scikit-learn's objective, written out in NumPy) and 1/10/100-shot class means."""
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lt_utils.data_loaders import k_shot_indices
from lt_utils.errors import UserError
from lt_utils.head_init import HEAD_INITS, balanced_logistic_regression
from lt_utils.spec import ModelSpec
from lt_utils.models import build_lt_model
from tests.helpers_models import random_pixels


def _np_gradient(x, y, w, b, num_classes, c=1.0, balanced=True):
    """Gradient of C * sum_i s_{y_i} CE(W x_i + b, y_i) + ||W||^2 / 2; s_c = N / (C n_c) (balanced) or 1."""
    counts = np.bincount(y, minlength=num_classes)
    s = (len(y) / (num_classes * counts))[y] if balanced else np.ones(len(y))
    z = x @ w.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    r = c * s[:, None] * (p - np.eye(num_classes)[y])  # d loss / d z
    return r.T @ x + w, r.sum(0)


def _imbalanced_features(seed=0, per_class=(60, 20, 6, 3), dim=5):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(per_class)), per_class)
    centres = rng.normal(scale=1.5, size=(len(per_class), dim))
    x = centres[y] + rng.normal(size=(len(y), dim))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def test_linear_probe_solves_the_balanced_logistic_regression():
    x, y = _imbalanced_features()
    w, b = balanced_logistic_regression(x, y, 4, device="cpu")
    xn, yn = x.double().numpy(), y.numpy()
    gw, gb = _np_gradient(xn, yn, w.numpy(), b.numpy(), 4)
    # at the minimiser of the strictly convex objective the gradient vanishes (its terms are of order N = 89)
    assert np.abs(gw).max() < 1e-4 and np.abs(gb).max() < 1e-4
    # and it is the balanced objective's minimiser, not the plain one's
    gw_plain, _ = _np_gradient(xn, yn, w.numpy(), b.numpy(), 4, balanced=False)
    assert np.abs(gw_plain).max() > 1.0
    w_more, b_more = balanced_logistic_regression(x, y, 4, c=10.0, device="cpu")
    assert np.abs(_np_gradient(xn, yn, w_more.numpy(), b_more.numpy(), 4, c=10.0)[0]).max() < 1e-3
    assert w_more.norm() > w.norm() > 0.1  # a weaker L2 penalty gives larger weights
    with pytest.raises(UserError, match=r"classes \[3\] have no training images"):
        balanced_logistic_regression(x[:86], y[:86], 4, device="cpu")


def test_k_shot_indices_seeded_per_class():
    labels = [0] * 30 + [1] * 5 + [2] * 12 + [0] * 3
    picked = k_shot_indices(labels, 10, seed=0)
    by_class = np.bincount(np.asarray(labels)[picked], minlength=3)
    assert by_class.tolist() == [10, 5, 10] and picked == sorted(set(picked))
    assert picked == k_shot_indices(labels, 10, seed=0) != k_shot_indices(labels, 10, seed=1)
    assert np.bincount(np.asarray(labels)[k_shot_indices(labels, 1, 3)]).tolist() == [1, 1, 1]


def _loader(pixels, labels, batch=4):
    return [{"pixel_values": pixels[i:i + batch], "labels": labels[i:i + batch]} for i in range(0, len(labels), batch)]


def test_registered_k_shot_and_linear_probe_inits(vit_dir):
    assert {"1_shot", "10_shot", "100_shot", "linear_probe"} <= set(HEAD_INITS)
    model = build_lt_model(vit_dir, num_classes=3)
    pixels, labels = random_pixels(12), torch.tensor([0, 1, 2] * 4)
    asked = []

    def loader_fn(spec, shots=None):  # train_lt.py's: the k-shot subset of the train split, in the eval view
        asked.append(shots)
        idx = list(range(len(labels))) if shots is None else k_shot_indices(labels.tolist(), shots, 0)
        return _loader(pixels[idx], labels[idx])

    spec, info = ModelSpec(), types.SimpleNamespace(class_names=["a", "b", "c"])
    acc = types.SimpleNamespace(device=torch.device("cpu"))
    one_shot = HEAD_INITS.get("1_shot")(spec, info, model, acc, loader_fn)
    with torch.no_grad():
        feats = model.eval().features(pixels)
    idx = k_shot_indices(labels.tolist(), 1, 0)
    torch.testing.assert_close(one_shot, F.normalize(feats[idx], dim=-1)[labels[idx].argsort()])
    probe = HEAD_INITS.get("linear_probe")(spec, info, model, acc, loader_fn)
    w, _ = balanced_logistic_regression(feats, labels, 3, device="cpu")
    torch.testing.assert_close(probe, F.normalize(w, dim=-1).float())
    assert asked == [1, None]
