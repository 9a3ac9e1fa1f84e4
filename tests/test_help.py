"""`--help` of the command lines is instant: it imports neither torch nor transformers (nor datasets, accelerate,
peft), because every choice list the flag table shows is declared without them (lt_utils/axes.py declares the
registries whose code needs torch, by "module:attr", imported on first use) and the scripts import their stack after
parsing; it still lists every flag and the live registries' names."""
import inspect
import json
import re
import subprocess
import sys

import pytest

from helpers_cli import entry_main
from helpers_train import REPO
from lt_utils import axes
from lt_utils.config import FLAGS, build_train_parser
from lt_utils.errors import UserError
from lt_utils.registry import Registry

SCRIPTS = ["train_lt.py", "eval_lt.py", "soup.py", "predict.py", "data_scripts/build_lt.py",
           "scripts/convert_export.py", "scripts/reproduce.py"]
HEAVY = {"torch", "transformers", "datasets", "accelerate", "peft"}
COLUMNS = "120"  # the same wrapping here and in the subprocess


def parser_of(script):
    if script == "train_lt.py":
        return build_train_parser()
    return inspect.unwrap(entry_main(script)).__globals__["get_args_parser"]()  # main's module, however loaded


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


def _listed(names=FLAGS):
    """flag name -> its choices as --help lists them (the table's lists, read in this process)."""
    return {name: FLAGS[name].choice_list() for name in names
            if name in FLAGS and FLAGS[name].choices is not None and not getattr(FLAGS[name].choices, "unlisted", 0)}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_the_help_of_the_live_parser(helps, script, monkeypatch):
    """Every flag, with the choices and method descriptions the registries of this process give."""
    text, _ = helps[script]
    monkeypatch.setenv("COLUMNS", COLUMNS)
    parser = parser_of(script)
    parser.prog = script.split("/")[-1]
    assert text == parser.format_help()
    options = {option for action in parser._actions for option in action.option_strings}
    assert all(re.search(rf"{option}\b", text) for option in options)
    flat = "".join(text.split())  # argparse wraps lines inside a choice too (max-autotune)
    for name, choices in _listed({action.dest for action in parser._actions}).items():
        assert re.search(re.escape("choices:" + ",".join(map(str, choices))) + r"(?![,\w])", flat), name


def test_every_axis_is_a_flags_live_list():
    """Each list lt_utils.axes declares is what a flag offers, read from it (no other copy of it): a tuple is a flag's
    choices itself, and an entry added to a registry is listed at once."""
    tuples = [obj for obj in vars(axes).values() if isinstance(obj, tuple)]
    registries = [obj for obj in vars(axes).values() if isinstance(obj, Registry)]
    assert tuples and registries
    for names in tuples:
        assert any(flag.choices is names for flag in FLAGS.values()), names
    for registry in registries:
        registry.register("help_probe", object())
        try:
            assert any("help_probe" in choices for choices in _listed().values()), registry
        finally:
            registry.unregister("help_probe")


def test_registered_entry_is_offered_at_once():
    """A loss registered through the public API is a choice of --loss in --help and on the command line."""
    probe = "help_probe_loss"
    axes.LOSSES.register(probe, lambda train_counts, options: None)
    try:
        parser = build_train_parser()
        flat = " ".join(parser.format_help().split())
        assert "choices: " + ", ".join(axes.LOSSES.names()) in flat and probe in flat
        assert parser.parse_args(["--loss", probe]).loss == probe
    finally:
        axes.LOSSES.unregister(probe)
    assert probe not in " ".join(build_train_parser().format_help().split())
    with pytest.raises(UserError, match=f"--loss {probe} is not a valid choice"):
        build_train_parser().parse_args(["--loss", probe])


def test_declared_entries_load_on_first_get():
    """A declared entry is named, listed and checked like a registered one and imported only when got."""
    reg = Registry("codec", flag="--codec", declared={"json": "json:dumps", "rel": ".registry:Registry"},
                   package="lt_utils")
    assert reg.names() == ["json", "rel"] and "json" in reg and len(reg) == 2
    assert reg.get("json") is json.dumps and reg.get("rel") is Registry
    with pytest.raises(UserError, match="unknown --codec 'yaml'; choose one of json, rel"):
        reg.get("yaml")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("json", json.loads)
