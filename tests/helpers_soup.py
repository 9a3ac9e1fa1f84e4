"""Soup ingredients for tests: export dirs written with the real `write_export` and `Exporter.meta`.

    base = make_tiny_vit(tmp / "vit")
    lt = tiny_lt_model(base, num_labels=4)                    # the pretrained LTModel the ingredients start from
    write_ingredient(tmp / "a", lt, base, {"head.weight": w}, head_init=w0)
    write_lora_ingredient(tmp / "l", base, head_init=w0, seed=1)   # random non-zero LoRA factors and head

`small_fashion_mnist(dir)` writes a real-image subset of Debian's Fashion-MNIST in IDX format (few images per class).
"""
import gzip
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from lt_utils.checkpoint import write_export
from lt_utils.data import LTInfo
from lt_utils.fileio import atomic_write_json
from lt_utils.head_init import set_head_weight
from lt_utils.models import build_lt_model
from lt_utils.peft_methods import apply_method
from lt_utils.exports import Exporter

from tests.helpers_data import idx_bytes

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
FULL_ARCH = {"adapters": None, "adapter_dim": None, "lora": None}


def tiny_info(num_labels=4, dataset="fashion_mnist_lt"):
    counts = [40 // (i + 1) for i in range(num_labels)]
    return LTInfo(dataset=dataset, class_names=[f"class{i}" for i in range(num_labels)], train_counts=counts,
                  groups=["medium" if n >= 20 else "few" for n in counts], imb=float(counts[0] / counts[-1]),
                  max_per_class=counts[0], many_threshold=100, few_threshold=20)


def tiny_lt_model(base_dir, num_labels=4, head_type="cosine"):
    return build_lt_model(base_dir, num_labels, head_type=head_type)


def make_meta(base_dir, lt_model, head_init, method="full", arch=None, info=None, seed=0, balance_factor=None,
              output_dir="run/final", head_type="cosine", from_scratch=False):
    args = SimpleNamespace(model_name_or_path=str(base_dir), from_scratch=from_scratch, seed=seed, method=method,
                           head_type=head_type, head_scale=25.0, head_init="class_mean", init_from=None,
                           balance_factor=balance_factor, output_dir=output_dir)
    return Exporter(args, info or tiny_info(lt_model.num_classes), lt_model, arch or dict(FULL_ARCH), head_init).meta()


def write_ingredient(path, lt_model, base_dir, tensors, head_init, method="full", arch=None, info=None, metrics=None,
                     hub_files=True, **meta_kwargs):
    """A plain (full / BitFit / head / AdaptFormer) export holding `tensors` in LTModel key names (hub_files=False:
    synthetic tensors that are no model, for soup arithmetic)."""
    info = info or tiny_info(lt_model.num_classes)
    meta = make_meta(base_dir, lt_model, head_init, method, arch, info, output_dir=str(path), **meta_kwargs)
    write_export(path, meta, tensors, {"weight": head_init}, _writers(info, metrics), hub_files=hub_files)
    return Path(path)


def _writers(info, metrics):
    writers = [lambda d: info.save(Path(d) / "lt_info.json")]
    if metrics is not None:
        writers.append(lambda d: atomic_write_json(Path(d) / "metrics.json", metrics))
    return writers


def perturbed(state, keys, seed, scale=0.1):
    """{key: state[key] + scale * N(0, 1)} with a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return {k: state[k] + scale * torch.randn(state[k].shape, generator=g) for k in keys}


def write_lora_ingredient(path, base_dir, head_init, seed, num_labels=4, r=4, lora_alpha=2.0, info=None):
    """A LoRA export (peft adapter + head as modules_to_save) with seeded random non-zero A, B and head."""
    lt = tiny_lt_model(base_dir, num_labels)
    set_head_weight(lt, head_init)
    model = apply_method(lt, "lora", r=r, lora_alpha=lora_alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:  # lora_A, lora_B and the trainable head copy
                param.add_(0.2 * torch.randn(param.shape, generator=g))
    arch = {"adapters": None, "adapter_dim": None,
            "lora": {"r": r, "lora_alpha": lora_alpha, "lora_dropout": 0.0, "lora_target_modules": None}}
    info = info or tiny_info(num_labels)
    meta = make_meta(base_dir, lt, head_init, "lora", arch, info, output_dir=str(path))
    meta["has_weights_file"] = False
    # peft's save_pretrained(state_dict=...) takes the full model state dict and extracts the adapter itself
    write_export(path, meta, {}, {"weight": head_init}, _writers(info, None), peft_model=model,
                 peft_state_dict=model.state_dict())
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
