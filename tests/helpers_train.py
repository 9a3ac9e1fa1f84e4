"""Small learnable data in Fashion-MNIST's IDX format, and helpers to run the entry scripts in tests."""
import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TINY_VIT = REPO / "configs" / "models" / "vit_tiny_fmnist"


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def synthetic_images(labels, rng, size=28):
    """Class c: a noisy image of brightness 30 + 20c, so crops and flips keep the class (easy, not trivial)."""
    base = 30 + 20 * np.asarray(labels)[:, None, None]
    return np.clip(base + rng.integers(-15, 16, size=(len(labels), size, size)), 0, 255).astype(np.uint8)


def write_synthetic_idx(root, train_per_class=60, test_per_class=10, num_classes=10, seed=0):
    """Four gzip'd IDX files named as Fashion-MNIST's, so `fashion_mnist_lt --data_dir root` reads them."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for stem, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        labels = np.repeat(np.arange(num_classes), per_class)
        rng.shuffle(labels)
        _write_idx(root / f"{stem}-images-idx3-ubyte.gz", synthetic_images(labels, rng))
        _write_idx(root / f"{stem}-labels-idx1-ubyte.gz", labels)
    return root


def tiny_train_args(data_dir, output_dir, *extra):
    """Flags of a seconds-long train_lt.py run on the synthetic IDX data with the tiny ViT config."""
    return ["--dataset", "fashion_mnist_lt", "--data_dir", str(data_dir), "--imb", "10", "--max_per_class", "40",
            "--val_per_class", "5", "--model_name_or_path", str(TINY_VIT), "--from_scratch", "true",
            "--head_init", "random", "--method", "full_all", "--optimizer", "adamw", "--learning_rate", "0.001",
            "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "64", "--num_workers", "0",
            "--num_train_epochs", "2", "--output_dir", str(output_dir), "--cache_dir", str(Path(output_dir).parent / "hf_cache"),
            *map(str, extra)]


# offline, one thread per process (tests run side by side on 2 cores)
QUIET_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def run_script(args, env=None, timeout=600, cwd=REPO):
    """Run a command (from the repo root unless told); returns CompletedProcess with text output."""
    full_env = {**os.environ, **QUIET_ENV, **(env or {})}
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def python_script(name, *args, **kwargs):
    return run_script([sys.executable, name, *map(str, args)], **kwargs)


# what every client run without this project starts with: proof that lt_utils cannot be imported, then its config
_CLIENT_PREAMBLE = r'''
import json, sys
from pathlib import Path
try:
    import lt_utils
    sys.exit("lt_utils is importable here")
except ImportError:
    pass
cfg = json.loads(Path(sys.argv[1]).read_text())
'''


def run_without_project(body, cfg, tmp_path):
    """`body` as a user's script (transformers / peft only): a fresh offline interpreter that cannot import lt_utils
    (-I: no PYTHONPATH, no user site, no script-dir magic; cwd is not the repo), `cfg` as its `cfg`; returns the JSON
    it writes to cfg["out"]."""
    cfg = {**cfg, "out": str(tmp_path / "out.json")}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "client.py").write_text(_CLIENT_PREAMBLE + body)
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1",
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-I", "client.py", "cfg.json"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp_path / "out.json").read_text())


def reset_accelerate():
    """Forget accelerate's process-wide state, so one test process can run several entry-script mains."""
    from lt_utils.training import reset_accelerate as reset

    reset()


def run_main(argv):
    """train_lt.main(argv) in this process, with accelerate's state reset first."""
    import train_lt

    reset_accelerate()
    return train_lt.main(argv)


def export_tensors(export_dir):
    """An export's model.safetensors in LTModel key names (transformers saves some backbones under their checkpoints'
    original names; the export's own key map renames them back)."""
    from safetensors.torch import load_file

    from lt_utils.checkpoint import read_export_config, weight_keys

    names = weight_keys(read_export_config(export_dir))
    return {names[k]: v for k, v in load_file(str(Path(export_dir) / "model.safetensors")).items()}


def reduction_order_atol(reference, reordered, steps, safety=4):
    """{tensor name: atol} for comparing a run with `reference` where the two are equal in exact arithmetic and differ
    only in the order float32 sums are taken (other processes, accumulation, kernels).

    Derivation: each float32 addition rounds at relative eps (2^-23); the rounding differs with the order, and enters
    every step's gradients and normalisation statistics; training then amplifies it (BatchNorm's 1/std, gradients
    that cancel to small sums) by a factor set by the model, the data and the CPU's kernels, not by a constant (the
    sync-BN test: 1e-7 relative per sum grows to 2.3e-3 of bn1's bias after 4 steps). So the size is measured where
    it arises: `reordered` is the same training computed in this process in another legitimate
    order, and the run under test is one more such order, so it differs from `reference` by the same amount up to the
    random size of one more set of roundings: `safety` x |reference - reordered| per tensor (the ratio measured in
    the tests is at most 1.6), plus one rounding of each weight per step (eps x |w| x steps) where the two orders
    happen to agree bit for bit."""
    import torch

    eps = torch.finfo(torch.float32).eps
    return {key: safety * (ref - reordered[key]).abs().max().item() + eps * ref.abs().max().item() * steps
            if ref.is_floating_point() else 0.0 for key, ref in reference.items()}


def assert_same_weights(a, b, atol):
    """a == b per tensor within atol: a number, or {tensor name: atol} (reduction_order_atol)."""
    import torch

    assert a.keys() == b.keys()
    for key in a:
        tol = atol[key] if isinstance(atol, dict) else atol
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=tol, msg=lambda m, key=key: f"{key}: {m}")


def assert_resumed_weights(resumed, uninterrupted):
    """A run resumed in the same process repeats the uninterrupted run's arithmetic in the same order (same batches,
    same kernels and thread count, the state restored bit for bit), so no rounding can differ: equal to the bit."""
    assert_same_weights(resumed, uninterrupted, atol=0)


def export_config(export_dir):
    """An export's config.json as a dict (the LTConfig record)."""
    return json.loads((Path(export_dir) / "config.json").read_text())
