"""`pip install .` gives the library (lt_utils, usable without the checkout on the path) and the commands lt-train,
lt-eval, lt-soup, lt-predict, lt-build; pyproject's lower bounds are the versions the tests run with."""
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import version

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from helpers_train import QUIET_ENV, REPO, tiny_train_args

CHECK = """
import importlib.metadata, os, sys
import lt_utils, lt_utils.data, lt_utils.lt_metric
from lt_utils.metrics import compute_lt_metrics
assert os.path.realpath(lt_utils.__file__).startswith(os.path.realpath(sys.argv[1])), lt_utils.__file__
assert importlib.metadata.version("lt-hf") == lt_utils.__version__
m = compute_lt_metrics([0, 1, 1, 2], [0, 1, 2, 2], 3, ["many", "medium", "few"])
print(m["accuracy"], m["few_acc"])
"""
COMMANDS = {"lt-train": "train_lt.py", "lt-eval": "eval_lt.py", "lt-soup": "soup.py", "lt-predict": "predict.py",
            "lt-build": "data_scripts/build_lt.py"}


def _pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _lower_bound(requirement):
    bounds = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==")]
    assert len(bounds) == 1, f"{requirement}: one lower bound (>= or ==) expected"
    return bounds[0]


def test_lower_bounds_are_the_tested_versions():
    """Each dependency's lower bound is requirements.txt's (what scripts/install.sh installs and CI runs), and the
    installed version meets it: no bound below what the code was run with."""
    tested = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            req = Requirement(line)
            tested[req.name.lower()] = req
    project = _pyproject()["project"]
    deps = [Requirement(d) for d in project["dependencies"] + project["optional-dependencies"]["test"]]
    for dep in deps:
        assert dep.name.lower() in tested, f"{dep.name} is not in requirements.txt, the tested set"
        assert _lower_bound(dep) == _lower_bound(tested[dep.name.lower()]), (dep, tested[dep.name.lower()])
        assert dep.specifier.contains(version(dep.name), prereleases=True), (dep, version(dep.name))
    assert sorted(d.name.lower() for d in deps) == sorted(tested)
    deepspeed = Requirement(project["optional-dependencies"]["deepspeed"][0])
    pinned = re.search(r'"deepspeed==([\d.]+)"', (REPO / "scripts" / "install.sh").read_text()).group(1)
    assert _lower_bound(deepspeed) == Version(pinned)


def test_console_scripts_call_the_entry_scripts_main():
    scripts = _pyproject()["project"]["scripts"]
    assert {name: target.split(":")[0].replace(".", "/") + ".py" for name, target in scripts.items()} == COMMANDS
    assert set(scripts.values()) == {f"{path[:-3].replace('/', '.')}:main.console" for path in COMMANDS.values()}


@pytest.mark.slow  # a venv, pip, and commands in fresh interpreters
def test_pip_install_gives_the_library_and_the_commands(idx_dir, tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md", *(p for p in COMMANDS.values() if "/" not in p)):
        shutil.copy(REPO / name, src / name)
    for folder in ("lt_utils", "data_scripts"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                          "--no-deps", "--no-build-isolation", str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    site = next((venv / "lib").glob("python*/site-packages"))
    env = {**os.environ, **QUIET_ENV, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)  # the installed copy only, never the checkout
    run = lambda *argv: subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    res = run(str(venv / "bin" / "python"), "-c", CHECK, str(site))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["75.0", "50.0"]
    for command in COMMANDS:
        assert (venv / "bin" / command).is_file(), command
    # lt-build writes a split that datasets reads back; lt-train builds a model on it (main returns a value: exit 0)
    res = run("lt-build", "--dataset", "fashion_mnist", "--data_dir", idx_dir, "--imb", "10", "--max_per_class", "40",
              "--val_per_class", "5", "--cache_dir", tmp_path / "cache", "--output_dir", tmp_path / "split")
    assert res.returncode == 0, res.stderr[-3000:]
    import datasets

    counts = json.loads((tmp_path / "split" / "lt_info.json").read_text())["train_counts"]
    assert (counts[0], counts[-1]) == (40, 4)
    assert datasets.load_from_disk(str(tmp_path / "split"))["train"].num_rows == sum(counts)
    res = run("lt-train", *tiny_train_args(idx_dir, tmp_path / "run", "--dry_run"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["method"] == "full_all"
    res = run("lt-eval", "--split", "dev")  # a refusal: one line, status 2
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: --split dev")
