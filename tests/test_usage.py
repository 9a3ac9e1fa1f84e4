"""The usage lines as a new user types them, from a directory other than the repository: the quick-start preset,
`soup.py ckpts/*` over run folders, `eval_lt.py` on the printed soup; and the rules behind them."""
import json
import shutil
from pathlib import Path

import pytest

from helpers_cli import run_cli
from helpers_train import REPO, TINY_VIT
from lt_utils.config import build_train_parser, parse_args_with_config
from lt_utils.errors import UserError
from lt_utils.runs import default_soup_dir, expand_ingredients, run_export
from lt_utils.soup import sha256_file

PRESET = REPO / "configs" / "quickstart_fashion_mnist.yaml"
# the preset as shipped, shortened to seconds: a few steps, a seeded 500-image slice of val/test
SHORT = ["--max_train_steps", "6", "--max_eval_samples", "500"]


def run_in(cwd, script, *args, env=None):
    """`python <repo>/script args` typed in `cwd`, run in this process (run_cli); test_help.py starts the scripts as
    real processes from another directory."""
    return run_cli(script, *args, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    """An empty directory outside the repository with two quick-start runs from the same initialisation."""
    cwd = tmp_path_factory.mktemp("user")
    env = {"HF_DATASETS_CACHE": str(tmp_path_factory.mktemp("hf_datasets"))}
    for name, lr in (("a", "0.002"), ("b", "0.001")):
        res = run_in(cwd, "train_lt.py", "--config", PRESET, "--output_dir", f"ckpts/{name}",
                     "--learning_rate", lr, *SHORT, env=env)
        assert res.returncode == 0, res.stderr[-3000:]
    return cwd, env


def test_quickstart_from_another_directory_then_soup_and_eval(user_dir):
    """Issue 13's scenario: train twice from an empty directory, `soup.py ckpts/*`, eval the printed soup folder."""
    cwd, env = user_dir
    for name in ("a", "b"):  # outputs where the user said (relative to the working dir), the model from the repo
        config = (cwd / "ckpts" / name / "config.yaml").read_text()
        assert f"model_name_or_path: {TINY_VIT}" in config and f"output_dir: ckpts/{name}" in config
        assert (cwd / "ckpts" / name / "best" / "config.json").is_file()
    (cwd / "ckpts" / "train.log").write_text("a log the glob also matches\n")
    glob = sorted(str(p.relative_to(cwd)) for p in (cwd / "ckpts").iterdir())
    assert glob == ["ckpts/a", "ckpts/b", "ckpts/train.log"]

    res = run_in(cwd, "soup.py", *glob, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "skipping ckpts/train.log: a file, not a run or export dir" in res.stdout
    assert "soup written to soups/uniform:" in res.stdout
    manifest = json.loads((cwd / "soups" / "uniform" / "soup_manifest.json").read_text())
    assert manifest["ingredients"] == ["ckpts/a/best", "ckpts/b/best"] and manifest["weights"] == [0.5, 0.5]

    res = run_in(cwd, "eval_lt.py", "soups/uniform", "--max_eval_samples", "500", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((cwd / "soups" / "uniform" / "eval_test" / "metrics.json").read_text())
    assert metrics["metrics"]["num_samples"] == 500 and 0 <= metrics["metrics"]["accuracy"] <= 100
    assert metrics["config"]["dataset"]["dataset"] == "fashion_mnist_lt"
    assert (cwd / "soups" / "uniform" / "eval_test" / "per_class.csv").is_file()

    # a run dir on eval_lt.py: its best/ by default, final/ with --which final
    res = run_in(cwd, "eval_lt.py", "ckpts/a", "--which", "final", "--max_eval_samples", "500", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (cwd / "ckpts" / "a" / "final" / "eval_test" / "metrics.json").is_file()
    assert not (cwd / "ckpts" / "a" / "best" / "eval_test").exists()


def test_second_soup_skips_the_first_and_never_overwrites(user_dir):
    cwd, env = user_dir
    first = cwd / "soups" / "uniform"
    if not first.exists():  # this test alone: make the first soup
        assert run_in(cwd, "soup.py", "ckpts/a", "ckpts/b", env=env).returncode == 0
    before = sha256_file(first / "model.safetensors")
    shutil.copytree(first, cwd / "ckpts" / "old_soup")  # an earlier soup the glob matches
    try:
        res = run_in(cwd, "soup.py", "ckpts/a", "ckpts/b", "ckpts/old_soup", "--which", "final", env=env)
    finally:
        shutil.rmtree(cwd / "ckpts" / "old_soup")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "skipping ckpts/old_soup: a soup, not a training run" in res.stdout
    assert "soup written to soups/uniform_2:" in res.stdout
    manifest = json.loads((cwd / "soups" / "uniform_2" / "soup_manifest.json").read_text())
    assert manifest["ingredients"] == ["ckpts/a/final", "ckpts/b/final"]
    assert sha256_file(first / "model.safetensors") == before


def test_soup_of_no_run_is_one_line_error(user_dir):
    cwd, env = user_dir
    (cwd / "notes.txt").write_text("x")
    res = run_in(cwd, "soup.py", "notes.txt", env=env)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        "error: none of the inputs is a run dir (with best/ or final/) or an export dir; pass train_lt.py's output "
        "folders, e.g. python soup.py ckpts/*"]


# ------------------------------------------------------------------------------------------ rules, in-process
def _export(path, method="full"):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "lt_classifier", "method": method}))
    return path


def test_run_export_rule(tmp_path):
    run = tmp_path / "run"
    _export(run / "final")
    assert run_export(run) == run / "final"  # no best/: final/
    _export(run / "best")
    assert run_export(run) == run / "best" and run_export(run, "final") == run / "final"
    assert run_export(run / "final") == run / "final"
    only_final = tmp_path / "only_final"
    _export(only_final / "final")
    with pytest.raises(UserError, match="without a best/ export; pass --which final"):
        run_export(only_final, "best")
    assert run_export(tmp_path / "missing") is None


def test_expand_ingredients_soups_alone_are_merged(tmp_path):
    s1, s2 = _export(tmp_path / "s1", "soup"), _export(tmp_path / "s2", "soup")
    picked, notes = expand_ingredients([str(s1), str(s2)])
    assert picked == [str(s1), str(s2)] and notes == []


def test_default_soup_dir_leaves_the_ingredients(tmp_path):
    run = tmp_path / "ckpts" / "a"
    _export(run / "best")
    # working inside a run: the soup goes above it, not into it
    assert default_soup_dir("uniform", [str(run / "best")], cwd=run / "best") == tmp_path / "ckpts" / "soups" / "uniform"
    assert default_soup_dir("uniform", [str(run / "best")], cwd=run) == tmp_path / "ckpts" / "soups" / "uniform"
    assert default_soup_dir("greedy", [str(run / "best")], cwd=tmp_path) == Path("soups/greedy")
    (tmp_path / "soups" / "greedy").mkdir(parents=True)
    (tmp_path / "soups" / "greedy_2").mkdir()
    assert default_soup_dir("greedy", [str(run / "best")], cwd=tmp_path) == Path("soups/greedy_3")


def test_preset_paths_resolve_next_to_the_preset_or_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parse = lambda *argv: parse_args_with_config(build_train_parser(), list(map(str, argv)))  # noqa: E731
    # the shipped preset names configs/models/vit_tiny_fmnist (repository-relative) and outputs/quickstart
    args = parse("--config", PRESET)
    assert args.model_name_or_path == str(TINY_VIT) and args.output_dir == "outputs/quickstart"
    # a path typed on the command line stays relative to the working directory
    args = parse("--config", PRESET, "--model_name_or_path", "my_model")
    assert args.model_name_or_path == "my_model"
    # a user's preset: its paths next to it win; Hub ids and dataset names are kept as written
    (tmp_path / "presets" / "lists").mkdir(parents=True)
    (tmp_path / "presets" / "lists" / "train.txt").write_text("a.png 0\n")
    (tmp_path / "presets" / "mine.yaml").write_text(
        "model_name_or_path: openai/clip-vit-base-patch16\ntrain_list: lists/train.txt\ndataset: imagenet_lt\n"
        "test_list: lists/missing.txt\n")
    sub = tmp_path / "elsewhere"
    sub.mkdir()
    monkeypatch.chdir(sub)
    args = parse("--config", tmp_path / "presets" / "mine.yaml")
    assert args.train_list == str(tmp_path / "presets" / "lists" / "train.txt")
    assert args.model_name_or_path == "openai/clip-vit-base-patch16" and args.dataset == "imagenet_lt"
    assert args.test_list == "lists/missing.txt"  # found nowhere: left for the data loader to report
