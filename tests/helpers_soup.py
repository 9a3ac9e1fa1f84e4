"""Soup ingredients for tests: export dirs written with the real `Exporter.write` and `lt_config`.

    base = make_tiny_vit(tmp / "vit")
    lt = tiny_lt_model(base, num_labels=4)                    # the pretrained LTModel the ingredients start from
    write_ingredient(tmp / "a", lt, base, {"head.weight": w}, head_init=w0)
    write_lora_ingredient(tmp / "l", base, head_init=w0, seed=1)   # random non-zero LoRA factors and head

`small_fashion_mnist(dir)` writes a real-image subset of Debian's Fashion-MNIST in IDX format (few images per class).
"""
import gzip
from pathlib import Path

import numpy as np
import torch

from lt_utils.data import LTInfo
from lt_utils.exports import Exporter
from lt_utils.head_init import set_head_weight
from lt_utils.heads import fingerprint
from lt_utils.methods import method_config
from lt_utils.models import build_lt_model, lt_config
from lt_utils.peft_methods import apply_method, merge_lora_state_dict

from tests.helpers_data import idx_bytes

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def tiny_info(num_labels=4, dataset="fashion_mnist_lt"):
    counts = [40 // (i + 1) for i in range(num_labels)]
    return LTInfo(dataset=dataset, class_names=[f"class{i}" for i in range(num_labels)], train_counts=counts,
                  groups=["medium" if n >= 20 else "few" for n in counts], imb=float(counts[0] / counts[-1]),
                  max_per_class=counts[0], many_threshold=100, few_threshold=20)


def tiny_lt_model(base_dir, num_labels=4, head_type="cosine"):
    return build_lt_model(base_dir, num_labels, head_type=head_type)


def make_exporter(base_dir, lt_model, head_init, method="full", info=None, seed=0, balance_factor=None,
                  output_dir="run/final", head_type="cosine", from_scratch=False, lora_config=None):
    """The Exporter train_lt.py would build for `lt_model` trained by `method` (a name, or the MethodConfig it was
    applied with) from `base_dir`."""
    info = info or tiny_info(lt_model.num_classes)
    if isinstance(method, str):
        method = method_config(method, lt_model.num_classes, lt_model.spec.num_layers)
    config = lt_config(lt_model, info.class_names, head_type, 25.0,
                       head_init={"init": "class_mean", "init_fingerprint": fingerprint(head_init)},
                       lt_info=info.to_dict(), base_model=str(base_dir), from_scratch=from_scratch, seed=seed,
                       method=method.to_record(), run={"balance_factor": balance_factor, "run_name": Path(output_dir).name,
                                                       "hub_model_id": None, "data_dir": None})
    return Exporter(config, lt_model, head_init, method.name, lora_config)


def write_ingredient(path, lt_model, base_dir, tensors, head_init, method="full", info=None, metrics=None, **kwargs):
    """An export of `lt_model` with `tensors` (LTModel key names) set on top of its weights (full / BitFit / head /
    AdaptFormer runs: the tensors they train)."""
    state = {**lt_model.state_dict(), **tensors}
    make_exporter(base_dir, lt_model, head_init, method, info, output_dir=str(path), **kwargs).write(
        path, state, metrics=metrics)
    return Path(path)


def perturbed(state, keys, seed, scale=0.1):
    """{key: state[key] + scale * N(0, 1)} with a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return {k: state[k] + scale * torch.randn(state[k].shape, generator=g) for k in keys}


def lora_model(base_dir, head_init, seed, num_labels=4, r=4, lora_alpha=2.0):
    """A peft LoRA model (head as modules_to_save) with seeded random non-zero A, B and head."""
    lt = tiny_lt_model(base_dir, num_labels)
    set_head_weight(lt, head_init)
    model = apply_method(lt, "lora", r=r, lora_alpha=lora_alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:  # lora_A, lora_B and the trainable head copy
                param.add_(0.2 * torch.randn(param.shape, generator=g))
    return lt, model


def write_lora_ingredient(path, base_dir, head_init, seed, num_labels=4, r=4, lora_alpha=2.0, info=None):
    """A LoRA export, written as train_lt.py writes one: LoRA merged into model.safetensors, the plain adapter/."""
    lt, model = lora_model(base_dir, head_init, seed, num_labels, r, lora_alpha)
    lora_config = model.peft_config["default"]
    exporter = make_exporter(base_dir, lt, head_init, "lora", info=info, output_dir=str(path), lora_config=lora_config)
    exporter.write(path, *merge_lora_state_dict(model.state_dict(), lora_config))
    return Path(path)


def small_fashion_mnist(root, train_per_class=60, test_per_class=10):
    """The first images of each class of Debian's Fashion-MNIST, written back as the four IDX files (gzipped)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        images = _read_idx(DEBIAN_FMNIST / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(DEBIAN_FMNIST / f"{prefix}-labels-idx1-ubyte.gz")
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
        for kind, array in (("images-idx3", images[keep]), ("labels-idx1", labels[keep])):
            (root / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(idx_bytes(array), mtime=0))
    return root


def _read_idx(path):
    raw = gzip.decompress(Path(path).read_bytes())
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def write_adaptformer_ingredients(root, base_dir, head_init, num_labels=4, n=2):
    """n AdaptFormer exports (r 2) whose head and one adapter up-projection are head_init and ones times 1 .. n;
    returns (paths, that adapter key, the i = 1 tensors)."""
    af = tiny_lt_model(base_dir, num_labels)
    config = method_config("adaptformer", num_labels, af.spec.num_layers, r=2)
    af = apply_method(af, config)
    up = next(k for k in af.state_dict() if k.startswith("adapters.") and k.endswith("up.weight"))
    keys = {"head.weight": head_init, up: torch.ones(af.state_dict()[up].shape)}
    paths = [write_ingredient(Path(root) / f"af{i}", af, base_dir, {k: v * (i + 1) for k, v in keys.items()}, head_init,
                              method=config) for i in range(n)]
    return paths, up, keys
