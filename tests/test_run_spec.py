"""The flag table's properties, the RunSpec generated from it, and resume comparing the recorded spec with the new one
as a whole, through train_lt.py's main(argv) on the tiny fixtures."""
import dataclasses
import json
import shutil
import sys

import pytest
import yaml

from helpers_faults import one_error_line, tree_digest
from helpers_train import REPO, run_main, tiny_train_args, write_synthetic_idx

sys.path.insert(0, str(REPO))
from lt_utils.config import (FLAGS, GROUPS, RESUME_FREE_FLAGS, TRAIN_FLAGS, build_train_parser,  # noqa: E402
                             parse_train_args)
from lt_utils.spec import PARTS, RunSpec, changed_flags, flat_record  # noqa: E402


# ------------------------------------------------------------------------------------------- the table itself
@pytest.mark.parametrize("name", FLAGS)
def test_every_flag_has_its_properties_set_consistently(name):
    flag = FLAGS[name]
    assert flag.group in (*GROUPS, "other")
    if flag.input_path:
        assert flag.kind == "path", "an input path is a path"
    assert flag.identity in (None, "data", "model")
    if flag.identity is not None:
        assert not flag.may_change, "what identifies the data or the model may not change on a resume"
    if flag.identity == "data":
        assert flag.group == "data"
    if flag.identity == "model":
        assert flag.group in ("model", "method")
    if flag.info_key is not None:
        assert flag.identity == "data", "only the data's identity is recorded in LTInfo"
    if flag.group == "other":
        assert not flag.may_change and flag.identity is None, "resume and identity concern train flags only"
    elif flag.kind == "path" and not flag.input_path:
        assert flag.may_change, "where a run writes (outputs, caches, checkpoints) never changes what it trains"
    if flag.secret:
        assert flag.may_change, "a secret is never recorded, so a resume cannot compare it"
    if flag.kind == "switch":
        assert flag.default is False
    if flag.default is not None:
        assert flag.coerce(name, flag.default) == flag.default, "the default passes the flag's own checks"


def test_train_parser_groups_come_from_the_flags():
    parser = build_train_parser()
    titles = {group.title: {a.dest for a in group._group_actions} for group in parser._action_groups}
    for name in TRAIN_FLAGS:
        assert name in titles[GROUPS[FLAGS[name].group]]
    assert set(parser._lt_flags) == set(TRAIN_FLAGS)


def test_spec_parts_cover_exactly_the_train_flags():
    fields = [(group, f) for group, part in PARTS.items() for f in dataclasses.fields(part)]
    names = [f.name for _, f in fields]
    assert len(names) == len(set(names)) and set(names) == set(TRAIN_FLAGS)
    for group, f in fields:
        assert FLAGS[f.name].group == group
        default = FLAGS[f.name].default
        assert f.default == (tuple(default) if isinstance(default, list) else default)
    assert [f.name for f in dataclasses.fields(RunSpec)] == list(GROUPS)


def test_spec_is_built_from_the_parsed_flags_and_frozen():
    values = parse_train_args(["--lora_target_modules", "q_proj", "v_proj", "--head_scale", "30"])
    spec = RunSpec.from_values(values)
    assert spec.model.head_scale == 30 and spec.method.lora_target_modules == ("q_proj", "v_proj")
    assert spec.values() == {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    assert flat_record(spec.record()) == {**values, "hub_token": None}
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.model.head_scale = 1.0
    assert changed_flags(flat_record(spec.record()), spec) == {}


@pytest.mark.parametrize("name", TRAIN_FLAGS)
def test_the_comparison_refuses_exactly_the_flags_that_may_not_change(name):
    base = RunSpec.from_values(parse_train_args([]))
    recorded = {**flat_record(base.record()), name: "another value"}
    assert list(changed_flags(recorded, base)) == ([] if name in RESUME_FREE_FLAGS else [name])


# --------------------------------------------------------------------------------------- resume, through main
FLAGS_OF_THE_RUN = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--eval_steps", "none"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    idx = write_synthetic_idx(root / "idx")
    copy = shutil.copytree(idx, root / "copy_of_idx")  # the same images in another folder
    run = root / "run"
    run_main(tiny_train_args(idx, run, *FLAGS_OF_THE_RUN))
    assert (run / "step_2" / "lt_resume.json").is_file() and (run / "all_results.json").is_file()
    return {"root": root, "idx": idx, "copy": copy, "run": run}


def interrupted(world, tmp_path):
    """The run as a kill after its first checkpoint leaves it."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(world["run"] / "step_2", out / "step_2")
    for name in ("config.yaml", "run_spec.json"):
        shutil.copy(world["run"] / name, out / name)
    return out


def resume_argv(world, out, *extra, data_dir=None):
    return tiny_train_args(data_dir or world["idx"], out, *FLAGS_OF_THE_RUN, "--resume_from_checkpoint", "latest",
                           *extra)


def refused(argv, out, capsys):
    before = tree_digest(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(list(map(str, argv)))
    line = one_error_line(capsys.readouterr().err)
    assert exit_info.value.code != 0
    assert tree_digest(out) == before, "a refused resume changed the run dir"
    return line


FIX = "relaunch with the same flags, pass --resume_allow_changes to continue anyway, or start a new --output_dir"
CHANGES = {  # flag: (new value, what the line shows)
    "head_scale": ("30", "--head_scale 25.0 -> 30.0"),
    "per_device_train_batch_size": ("8", "--per_device_train_batch_size 16 -> 8"),
    "seed": ("1", "--seed 0 -> 1"),
    "gradient_accumulation_steps": ("2", "--gradient_accumulation_steps 1 -> 2"),
    "optimizer": ("sgd", "--optimizer adamw -> sgd"),
    "learning_rate": ("0.5", "--learning_rate 0.001 -> 0.5"),
}


@pytest.mark.parametrize("flag", [*CHANGES, "data_dir"])
def test_resume_refuses_each_flag_that_changes_what_is_trained(world, tmp_path, capsys, flag):
    out = interrupted(world, tmp_path)
    if flag == "data_dir":
        argv, shown = resume_argv(world, out, data_dir=world["copy"]), f"--data_dir {world['idx']} -> {world['copy']}"
    else:
        value, shown = CHANGES[flag]
        argv = resume_argv(world, out, f"--{flag}", value)
    line = refused(argv, out, capsys)
    assert line.startswith(f"error: cannot resume from {out / 'step_2'}: flags changed since the checkpoint")
    assert f"({shown});" in line and line.endswith(FIX)


def test_resume_names_every_changed_flag_in_one_line(world, tmp_path, capsys):
    out = interrupted(world, tmp_path)
    line = refused(resume_argv(world, out, "--seed", "1", "--head_scale", "30", "--num_workers", "1"), out, capsys)
    assert "(--head_scale 25.0 -> 30.0, --seed 0 -> 1)" in line and "num_workers" not in line


def test_resume_allows_workers_eval_cadence_and_eval_batch(world, tmp_path):
    out = interrupted(world, tmp_path)
    run_main(resume_argv(world, out, "--num_workers", "1", "--eval_steps", "1", "--per_device_eval_batch_size", "32"))
    record = json.loads((out / "run_spec.json").read_text())
    assert record["resume_changes"] == [] and record["run_spec"]["eval"]["eval_steps"] == 1
    assert [json.loads(line)["step"] for line in (out / "log.txt").read_text().splitlines()] == [3, 4]
    assert json.loads((out / "step_4" / "lt_resume.json").read_text())["resume_changes"] == []


def test_resume_allow_changes_continues_and_records_the_changes(world, tmp_path, capsys):
    out = interrupted(world, tmp_path)
    changed = ["--head_scale", "30", "--optimizer", "sgd", "--resume_allow_changes"]
    run_main(resume_argv(world, out, *changed))  # another optimizer: it starts without AdamW's moments
    expected = {"step": 2, "resume_changes": {"head_scale": [25.0, 30.0], "optimizer": ["adamw", "sgd"]}}
    assert [json.loads(line) for line in (out / "log.txt").read_text().splitlines()] == [expected]
    record = json.loads((out / "run_spec.json").read_text())
    assert record["resume_changes"] == [expected] and record["run_spec"]["model"]["head_scale"] == 30
    assert yaml.safe_load((out / "config.yaml").read_text())["optimizer"] == "sgd"
    checkpoint = json.loads((out / "step_4" / "lt_resume.json").read_text())
    assert checkpoint["resume_changes"] == [expected] and checkpoint["run_spec"]["optim"]["optimizer"] == "sgd"
    assert (out / "final" / "model.safetensors").is_file()

    # the run now is the changed one: relaunched with its new flags it is a finished no-op, with the old ones refused
    before = tree_digest(out)
    run_main(resume_argv(world, out, *changed[:-1]))
    assert tree_digest(out) == before
    line = refused(resume_argv(world, out), out, capsys)
    assert "a finished run" in line and "--head_scale 30.0 -> 25.0, --optimizer sgd -> adamw" in line


def test_finished_run_relaunch_uses_the_same_comparison(world, capsys):
    run = world["run"]
    line = refused(resume_argv(world, run, "--gradient_accumulation_steps", "2"), run, capsys)
    assert line.startswith(f"error: cannot resume {run}, a finished run: flags changed since it ran "
                           "(--gradient_accumulation_steps 1 -> 2);")
    before = tree_digest(run)
    results = run_main(resume_argv(world, run, "--num_workers", "1", "--per_device_eval_batch_size", "8"))
    assert tree_digest(run) == before and results == json.loads((run / "all_results.json").read_text())
