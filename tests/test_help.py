"""`--help` of the five command lines is instant: it imports neither torch nor transformers (nor datasets, accelerate,
peft), because the flag table names the registries' modules instead of importing them and the scripts import their
stack after parsing; it still lists every flag and the registries' choices, exactly as the live registries give them."""
import importlib
import re
import subprocess
import sys

import pytest

from helpers_faults import load_build_lt
from helpers_train import REPO
from lt_utils import help_choices
from lt_utils.config import FLAGS, build_train_parser

SCRIPTS = ["train_lt.py", "eval_lt.py", "soup.py", "predict.py", "data_scripts/build_lt.py"]
HEAVY = {"torch", "transformers", "datasets", "accelerate", "peft"}
COLUMNS = "120"  # the same wrapping here and in the subprocess


def parser_of(script):
    if script == "train_lt.py":
        return build_train_parser()
    if script == "data_scripts/build_lt.py":
        return load_build_lt().get_args_parser()
    return importlib.import_module(script[:-3]).get_args_parser()


@pytest.fixture(scope="module")
def helps(tmp_path_factory):
    """`python -X importtime <repo>/script --help` from another directory: (help text, top-level packages imported)."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    out = {}
    for script in SCRIPTS:
        proc = subprocess.run([sys.executable, "-X", "importtime", str(REPO / script), "--help"], cwd=cwd,
                              capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin",
                                                                                "COLUMNS": COLUMNS})
        assert proc.returncode == 0, proc.stderr[-3000:]
        imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
                    if line.startswith("import time:")}
        out[script] = proc.stdout, imported
    return out


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_imports_no_heavy_package(helps, script):
    _, imported = helps[script]
    assert "lt_utils" in imported and not HEAVY & imported, sorted(HEAVY & imported)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_the_help_of_the_live_parser(helps, script, monkeypatch):
    """Every flag, with the choices and method descriptions the loaded registries give (the copies in
    lt_utils.help_choices that --help prints are equal to them)."""
    for flag in FLAGS.values():  # loads every module a list comes from: the parser below reads the live lists
        flag.choice_list()
    text, _ = helps[script]
    monkeypatch.setenv("COLUMNS", COLUMNS)
    parser = parser_of(script)
    parser.prog = script.split("/")[-1]
    assert text == parser.format_help()
    options = {option for action in parser._actions for option in action.option_strings}
    assert all(re.search(rf"{option}\b", text) for option in options)
    if script == "train_lt.py":
        flat = " ".join(text.split())
        for flag in ("method", "loss", "head_type", "head_init", "prompt_template", "tte"):
            assert "choices: " + ", ".join(FLAGS[flag].choice_list()) in flat, flag


def test_help_copies_are_the_live_lists():
    """Each list lt_utils.help_choices prints in place of a module's is that module's (update the copy if not)."""
    for flag in FLAGS.values():
        source = flag.choices
        if not hasattr(source, "key") or not source.in_help or source.light:  # a light module's list is read itself
            continue
        live = flag.choice_list()[len(source.extra):]
        assert list(help_choices.NAMES[source.key]) == live, f'update help_choices.NAMES["{source.key}"] = {live}'
