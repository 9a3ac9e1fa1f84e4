"""Every command line of the README and of the entry scripts' docstrings, collected from the text itself (a new one is
covered without editing this file): each is parsed by its script from a directory other than the repository, with
the repository's files named by absolute path as a user elsewhere would type them; its presets load and their paths
resolve; `accelerate launch` lines are validated by accelerate's launcher with their config file. The commands that
run offline are also run for real by other tests (test_usage, test_launch, test_hub_dataset, test_eval_lt,
test_soup, test_distributed)."""
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from helpers_train import REPO
from lt_utils.config import build_train_parser, parse_args_with_config

SOURCES = ["README.md", "train_lt.py", "eval_lt.py", "soup.py", "data_scripts/build_lt.py", "data_scripts/README.md"]
SCRIPTS = {"train_lt.py", "eval_lt.py", "soup.py", "predict.py", "data_scripts/build_lt.py", "scripts/convert_export.py",
           "scripts/reproduce.py"}
SKIP = ("bash scripts/", "sbatch ", "python3 -m pytest", "python benchmarks/")  # shell set-up, tests, benchmarks


def doc_commands():
    """(source, command) for every line starting with python / accelerate / a launcher, continuations joined."""
    found = []
    for source in SOURCES:
        text = (REPO / source).read_text().replace("\\\\\n", "\\\n")
        text = re.sub(r"\\\n\s*", " ", text)
        for line in text.splitlines():
            line = line.strip()
            if re.match(r"(python |accelerate launch |[A-Z_]+=\S+ (scripts/|torchrun ))", line) \
                    and not line.startswith(SKIP) and " ... " not in line + " ":
                found.append((source, line.split(" # ")[0].split("  #")[0].strip()))
    return found


def split_command(command):
    """(accelerate launch flags or None, script, script argv)."""
    tokens = shlex.split(command)
    while "=" in tokens[0]:  # env assignments
        tokens = tokens[1:]
    launch = None
    if tokens[:2] == ["accelerate", "launch"]:
        i = next(i for i, t in enumerate(tokens) if t in SCRIPTS)
        launch, tokens = tokens[2:i], tokens[i:]
    elif tokens[0] == "torchrun":
        tokens = tokens[next(i for i, t in enumerate(tokens) if t in SCRIPTS):]
    elif tokens[0] == "python":
        tokens = tokens[1:]
    return launch, tokens[0], tokens[1:]


def absolute(argv):
    """Repository files named relative to it (configs/..., accelerate_configs/...) as a user elsewhere types them."""
    return [str(REPO / a) if re.match(r"(configs|accelerate_configs)/", a) else a for a in argv]


def load_script(path):
    spec = importlib.util.spec_from_file_location(Path(path).stem + "_doc", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COMMANDS = doc_commands()


def test_commands_were_found():
    scripts = {split_command(c)[1] for _, c in COMMANDS}
    assert scripts == SCRIPTS and len(COMMANDS) >= 30, COMMANDS


@pytest.mark.parametrize("source,command", COMMANDS, ids=[f"{s}:{c[:60]}" for s, c in COMMANDS])
def test_doc_command_parses_from_another_directory(source, command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    launch, script, argv = split_command(command)
    argv = absolute(argv)
    try:
        if script == "train_lt.py":
            args = parse_args_with_config(build_train_parser(), argv)
            if "--config" in argv and "--model_name_or_path" not in argv:  # the preset's model: a Hub id or found
                model = args.model_name_or_path
                assert Path(model).is_dir() or re.fullmatch(r"[\w.-]+/[\w.-]+", model), model
        elif script == "data_scripts/build_lt.py":
            load_script(script).parse_args(argv)
        else:
            load_script(script).get_args_parser().parse_args(argv)
    except SystemExit as err:
        pytest.fail(f"{source}: `{command}` does not parse (exit {err.code})")
    if launch is not None:
        from accelerate.commands.launch import _validate_launch_command, launch_command_parser

        launch_args = launch_command_parser().parse_args(absolute(launch) + [str(REPO / script)])
        launch_args, _, _ = _validate_launch_command(launch_args)
        if "--config_file" in launch:
            assert Path(launch_args.config_file).is_file()
