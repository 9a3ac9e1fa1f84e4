"""`pip install .` installs lt_utils (the library) usable without the checkout on the path."""
import os
import shutil
import subprocess
import sys

import pytest

from helpers_train import REPO

pytestmark = pytest.mark.slow  # pip builds and installs the package

CHECK = """
import importlib.metadata, os, sys
import lt_utils, lt_utils.data, lt_utils.lt_metric
from lt_utils.metrics import compute_lt_metrics
assert os.path.realpath(lt_utils.__file__).startswith(os.path.realpath(sys.argv[1])), lt_utils.__file__
assert importlib.metadata.version("lt-hf") == lt_utils.__version__
m = compute_lt_metrics([0, 1, 1, 2], [0, 1, 2, 2], 3, ["many", "medium", "few"])
print(m["accuracy"], m["few_acc"])
"""


def test_pip_install_dot(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "lt_utils", src / "lt_utils", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in (target / "lt_utils" / "data").glob("*.py")) == sorted(
        p.name for p in (REPO / "lt_utils" / "data").glob("*.py"))
    env = {**os.environ, "PYTHONPATH": str(target)}  # not the checkout: the installed copy only
    res = subprocess.run([sys.executable, "-c", CHECK, str(target)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["75.0", "50.0"]
