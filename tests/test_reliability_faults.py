"""Kills at random moments (SIGKILL at a random file-system write event) during training, checkpoint writing, soup
writing and dataset building; the requeued command must end exactly where the uninterrupted one did, bit for bit.

Training runs use 159 images in batches of 64: 3 optimizer steps per epoch. Scenario `not_multiple` trains 4 steps
(checkpoints at 2 and 4, with an EMA), `multiple` trains 6 steps (checkpoints at 3 and 6): step counts that are
and are not multiples of an epoch, each with a checkpoint at the very last step.
"""
import json
import random
import shutil
from pathlib import Path

import pytest

from helpers_data import split_digest, write_image_folder
from helpers_faults import run_forked, tree_digest
from helpers_train import tiny_train_args, write_synthetic_idx

pytestmark = pytest.mark.slow  # dozens of runs killed and requeued

SCENARIOS = {
    "not_multiple": ["--max_train_steps", "4", "--checkpointing_steps", "2", "--eval_steps", "2", "--ema_decay", "0.5"],
    "multiple": ["--max_train_steps", "6", "--checkpointing_steps", "3", "--eval_steps", "3",
                 "--sampler", "class_balanced"],
}
TRIALS_PER_SCENARIO = 3  # 6 training kills, 5 soup kills, 5 dataset-build kills: 16 in all
WRITE_TRIALS = 5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    idx = write_synthetic_idx(root / "idx")
    refs = {}
    # build the datasets cache once first: every counted run then makes the same writes (none for the cache)
    assert run_forked("train", train_argv(idx, root / "warm_cache", next(iter(SCENARIOS))))[:2] == ("exit", 0)
    for name, flags in SCENARIOS.items():
        out = root / f"ref_{name}"
        outcome, code, events = run_forked("train", (train_argv(idx, out, name)))
        assert (outcome, code) == ("exit", 0)
        refs[name] = (out, events)
    return {"root": root, "idx": idx, "refs": refs}


def spread_kills(seed, events, trials):
    """`trials` kill points, one drawn at random from each of `trials` equal stretches of the write events, so early,
    middle and late writes (checkpoints, the last export) are all hit whatever the seed."""
    rng = random.Random(seed)
    edges = [1 + round(i * events / trials) for i in range(trials + 1)]
    return sorted({rng.randrange(lo, max(lo + 1, hi)) for lo, hi in zip(edges, edges[1:]) if lo <= events})


def train_argv(idx, out, scenario, *extra):
    return tiny_train_args(idx, out, "--per_device_train_batch_size", "64", *SCENARIOS[scenario], *extra,
                           "--cache_dir", str(Path(idx).parent / "hf_cache"))  # one warm cache for every run


def requeue(world, out, scenario):
    """What a cluster's requeue runs: resume from the latest checkpoint, or start over when there is none."""
    has_checkpoint = any((p / "lt_resume.json").is_file() for p in out.glob("step_*")) if out.is_dir() else False
    extra = ["--resume_from_checkpoint", "latest"] if has_checkpoint else ["--overwrite_output_dir"]
    outcome, code, _ = run_forked("train", (train_argv(world["idx"], out, scenario, *extra)))
    assert (outcome, code) == ("exit", 0), f"requeue of {out} ended with {outcome} {code}"


def assert_same_run(out, ref):
    for export in ("final", "best"):
        for name in ("model.safetensors", "head_init.safetensors"):
            assert (out / export / name).read_bytes() == (ref / export / name).read_bytes(), f"{export}/{name} differs"
    assert json.loads((out / "all_results.json").read_text()) == json.loads((ref / "all_results.json").read_text())
    assert (out / "log.txt").read_text() == (ref / "log.txt").read_text()  # no validation logged twice
    assert not list(out.glob(".*")), f"temp folders left: {list(out.glob('.*'))}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_training_killed_at_random_writes_resumes_bit_exact(world, tmp_path, scenario):
    ref, events = world["refs"][scenario]
    kills = spread_kills(f"kill-{scenario}", events, TRIALS_PER_SCENARIO)
    assert len(kills) == TRIALS_PER_SCENARIO
    for k in kills:
        out = tmp_path / f"kill_{k}"
        outcome, _, _ = run_forked("train", (train_argv(world["idx"], out, scenario)), kill_at=k)
        assert outcome == "killed"
        requeue(world, out, scenario)
        assert_same_run(out, ref)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_finished_run_relaunched_is_a_no_op(world, scenario):
    ref, _ = world["refs"][scenario]
    before = tree_digest(ref)
    outcome, code, _ = run_forked("train", (train_argv(world["idx"], ref, scenario,
                                                                      "--resume_from_checkpoint", "latest")))
    assert (outcome, code) == ("exit", 0)
    assert tree_digest(ref) == before


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_killed_after_the_last_checkpoint_resumes_without_an_extra_step(world, tmp_path, scenario):
    """The last checkpoint is at the last step: the resumed run trains nothing more and exports the same weights.
    An empty step dir (a copy cut short) is skipped by `latest`; temp folders of killed saves are removed."""
    ref, _ = world["refs"][scenario]
    out = tmp_path / "run"
    out.mkdir()
    for path in [*ref.glob("step_*"), ref / "best", ref / "log.txt", ref / "config.yaml"]:
        (shutil.copytree if path.is_dir() else shutil.copy)(path, out / path.name)
    (out / "step_99").mkdir()
    (out / ".step_12.tmp").mkdir()
    (out / ".final.tmp-nohost-1-abc").mkdir()
    requeue(world, out, scenario)
    shutil.rmtree(out / ".final.tmp-nohost-1-abc")  # another host's temp folder is never touched
    (out / "step_99").rmdir()
    assert_same_run(out, ref)


def test_resume_from_an_explicit_earlier_checkpoint_rewrites_later_ones(world, tmp_path):
    ref, _ = world["refs"]["not_multiple"]
    out = tmp_path / "run"
    out.mkdir()
    for name in ("step_2", "step_4", "best"):
        shutil.copytree(ref / name, out / name)
    shutil.copy(ref / "log.txt", out / "log.txt")
    outcome, code, _ = run_forked("train", (train_argv(world["idx"], out, "not_multiple",
                                                                      "--resume_from_checkpoint", str(out / "step_2"))))
    assert (outcome, code) == ("exit", 0)
    assert_same_run(out, ref)
    assert (out / "step_4" / "model.safetensors").read_bytes() == (ref / "step_4" / "model.safetensors").read_bytes()


def test_soup_killed_at_random_writes_is_whole_or_absent(world, tmp_path):
    ingredients = [str(world["refs"][s][0] / "final") for s in SCENARIOS]
    ref = tmp_path / "ref_soup"
    outcome, code, events = run_forked("soup", ([*ingredients, "--output_dir", str(ref)]))
    assert (outcome, code) == ("exit", 0)
    kills = spread_kills("soup", events, WRITE_TRIALS)
    assert len(kills) == WRITE_TRIALS
    for k in kills:
        out = tmp_path / f"soups_{k}" / "soup"
        outcome, _, _ = run_forked("soup", ([*ingredients, "--output_dir", str(out)]), kill_at=k)
        assert outcome == "killed"
        if out.exists():  # a soup that appeared is the complete one
            assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
        outcome, code, _ = run_forked("soup", ([*ingredients, "--output_dir", str(out), "--overwrite"]))
        assert (outcome, code) == ("exit", 0)
        assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
        assert sorted(p.name for p in out.parent.iterdir()) == ["soup"]  # the killed writer's temp folder is gone


def test_dataset_build_killed_at_random_writes_is_whole_or_absent(world, tmp_path):
    from lt_utils.data import load_lt_dataset

    images = write_image_folder(tmp_path / "images", [12, 9, 7, 6])
    argv = lambda out, cache: ["--dataset", "imagefolder_lt", "--data_dir", str(images), "--imb", "2",  # noqa: E731
                               "--test_per_class", "2", "--val_per_class", "1", "--output_dir", str(out),
                               "--cache_dir", str(cache)]
    ref = tmp_path / "ref_ds"
    outcome, code, events = run_forked("build", (argv(ref, tmp_path / "ref_cache")))
    assert (outcome, code) == ("exit", 0)
    want = split_digest(load_lt_dataset(str(ref))[0])
    kills = spread_kills("build", events, WRITE_TRIALS)
    assert len(kills) == WRITE_TRIALS
    for k in kills:
        out, cache = tmp_path / f"ds_{k}" / "ds", tmp_path / f"cache_{k}"
        outcome, _, _ = run_forked("build", (argv(out, cache)), kill_at=k)
        assert outcome == "killed"
        if out.exists():  # a saved dataset that appeared is complete and loadable
            assert split_digest(load_lt_dataset(str(out))[0]) == want
        outcome, code, _ = run_forked("build", ([*argv(out, cache), "--overwrite"]))
        assert (outcome, code) == ("exit", 0), f"rebuild after a kill at write {k} failed"
        assert split_digest(load_lt_dataset(str(out))[0]) == want
        assert sorted(p.name for p in out.parent.iterdir()) == ["ds"]
