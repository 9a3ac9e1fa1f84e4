"""Fashion-MNIST-LT on Debian's real IDX files: the offline quick-start split, via the CLI and the API."""
import hashlib
from pathlib import Path

import numpy as np

from helpers_cli import run_cli
from lt_utils.data import load_lt_dataset, load_lt_from_disk
from lt_utils.data.sources import DEBIAN_FASHION_MNIST_DIR, read_idx

COUNTS = [600, 359, 215, 129, 77, 46, 27, 16, 10, 6]


def _source_hashes(prefix):
    images = read_idx(DEBIAN_FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(DEBIAN_FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz")
    out = {}
    for img, y in zip(images, labels):
        out.setdefault(hashlib.sha1(img.tobytes()).hexdigest(), set()).add(int(y))
    return out


def _all_from(split, source):
    return all(int(row["label"]) in source.get(hashlib.sha1(np.asarray(row["image"]).tobytes()).hexdigest(), ())
               for row in split)


def test_quickstart_cli_and_api(tmp_path):
    out = tmp_path / "fmnist_lt100"
    res = run_cli("data_scripts/build_lt.py", "--dataset", "fashion_mnist", "--imb", "100", "--max_per_class", "600",
                  "--output_dir", out, "--cache_dir", tmp_path / "cache")
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert "splits: train 1,485 | validation 200 | test 10,000" in text
    assert "head 600 (T-shirt/top), tail 6 (Ankle boot)" in text
    assert "many 4 | medium 3 | few 3" in text
    bars = [line.split() for line in text.splitlines() if line.rstrip().endswith("#")]
    assert [int(b[-2]) for b in bars] == COUNTS

    ds, info = load_lt_from_disk(out)
    assert info.train_counts == COUNTS and info.source == f"local:{DEBIAN_FASHION_MNIST_DIR}"
    assert info.groups == ["many"] * 4 + ["medium"] * 3 + ["few"] * 3
    assert np.bincount(ds["train"]["label"]).tolist() == COUNTS
    assert np.bincount(ds["validation"]["label"]).tolist() == [20] * 10  # unused train images: every class has them
    assert np.bincount(ds["test"]["label"]).tolist() == [1000] * 10  # the full official test set
    train_src = _source_hashes("train")
    assert _all_from(ds["train"], train_src) and _all_from(ds["validation"], train_src)
    assert _all_from(ds["test"], _source_hashes("t10k"))

    # the API with data_dir=None resolves to Debian's files, so it hits the cache the CLI filled
    arrow = sorted((tmp_path / "cache").rglob("*.arrow"))
    ds2, info2 = load_lt_dataset("fashion_mnist_lt", imb=100, max_per_class=600, cache_dir=tmp_path / "cache")
    assert sorted((tmp_path / "cache").rglob("*.arrow")) == arrow
    assert info2 == info and ds2["train"]["label"] == ds["train"]["label"]
    assert not list(Path(tmp_path).glob(".fmnist_lt100.tmp-*"))
