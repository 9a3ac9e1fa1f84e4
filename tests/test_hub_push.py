"""The Hub from the command line: --push_to_hub checked before any compute (huggingface_hub's own offline, repo id
and token answers; the repo created first), a push made once per export (a relaunch pushes a finished run whose push
failed, and nothing more), and a built-in dataset without local files answered at once, offline."""
import json
import sys
import time

import huggingface_hub
import pytest
from huggingface_hub import constants

from helpers_cli import run_cli
from helpers_hub import ONLINE, closed_port, reachable_hub
from helpers_train import run_script, tiny_train_args


class FakeHubApi:
    """create_repo / upload_folder as the scripts call them, recorded; `fail_uploads` of them raise first."""

    def __init__(self, out, fail_uploads=0):
        self.out, self.fail_uploads, self.calls = out, fail_uploads, []

    def create_repo(self, repo_id, token=None, exist_ok=False, repo_type=None, **_):
        self.calls.append(("create_repo", repo_id, repo_type, self.out.exists()))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'me/' + repo_id}")

    def upload_folder(self, repo_id, folder_path, token=None, **_):
        self.calls.append(("upload_folder", repo_id, folder_path))
        if self.fail_uploads:
            self.fail_uploads -= 1
            raise ConnectionError("connection reset by peer")
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/abc", commit_message="",
                                          commit_description="", oid="abc")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with reachable_hub(monkeypatch, tmp_path):
        yield monkeypatch


def record_waits(monkeypatch):
    """The seconds of every time.sleep of 1 s or more from now on (huggingface_hub's retries wait so), not slept."""
    waits, sleep = [], time.sleep
    monkeypatch.setattr(time, "sleep", lambda s: waits.append(s) if s >= 1 else sleep(s))
    return waits


@pytest.mark.parametrize("case, flags, message", [
    ("offline", ["--hub_model_id", "me/tiny-lt"], "cannot be reached (HF_HUB_OFFLINE is set)"),
    ("unreachable", ["--hub_model_id", "me/tiny-lt"], "cannot be reached: Connection refused"),
    ("bad_id", ["--hub_model_id", "me/tiny--lt"], "--hub_model_id me/tiny--lt: not a Hub repo id"),
    ("no_token", ["--hub_model_id", "me/tiny-lt"], "needs a Hub token with write access; set HF_TOKEN"),
])
def test_push_problems_are_said_before_any_compute(idx_dir, tmp_path, hub, case, flags, message):
    if case == "unreachable":
        hub.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    if case == "no_token":
        hub.delenv("HF_TOKEN")
    out = tmp_path / "run"
    result = run_cli("train_lt.py", *tiny_train_args(idx_dir, out, "--push_to_hub", *flags),
                     env={"HF_HUB_OFFLINE": "1"} if case == "offline" else ONLINE)
    assert result.code == 2 and "Traceback" not in result.err
    assert message in result.err.strip().splitlines()[-1]
    assert not out.exists() and not (tmp_path / "hf_cache").exists()  # no data built, nothing written


@pytest.mark.parametrize("script, argv", [
    # before the ingredients (Hub ids here) are even downloaded
    ("soup.py", ["you/run-a", "you/run-b", "--push_to_hub", "--hub_model_id", "you/soup"]),
    ("data_scripts/build_lt.py", ["--dataset", "fashion_mnist", "--imb", "10", "--push_to_hub", "you/split"]),
])
def test_soup_and_build_check_the_hub_before_any_compute(script, argv, tmp_path):
    result = run_cli(script, *argv, "--output_dir", tmp_path / "out", "--cache_dir", tmp_path / "cache",
                     env={"HF_HUB_OFFLINE": "1"})
    assert result.code == 2 and "cannot be reached (HF_HUB_OFFLINE is set)" in result.err.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_a_failed_push_is_made_by_the_same_command_once(idx_dir, tmp_path, hub):
    out = tmp_path / "run"
    api = FakeHubApi(out, fail_uploads=1)
    hub.setattr(huggingface_hub, "create_repo", api.create_repo)
    hub.setattr(huggingface_hub, "upload_folder", api.upload_folder)
    argv = tiny_train_args(idx_dir, out, "--max_train_steps", "2", "--eval_steps", "1", "--checkpointing_steps", "2",
                           "--push_to_hub", "--hub_model_id", "tiny-lt", "--with_tracking")
    requeued = [*argv, "--resume_from_checkpoint", "latest"]  # what a requeued job runs again

    first = run_cli("train_lt.py", *argv, env=ONLINE)  # the upload fails after training: the exports stay, unpushed
    assert first.code == 2 and "then run the same command again" in first.err.strip().splitlines()[-1]
    assert (out / "all_results.json").is_file() and not (out / "hub_push.json").exists()
    assert any(p.name.startswith("events.out.tfevents") for p in out.rglob("*"))  # TensorBoard logs were written
    # the repo was created before the run dir existed; the table says which step best/ came from, and where all went
    assert api.calls[0] == ("create_repo", "tiny-lt", "model", False)
    assert api.calls[1] == ("upload_folder", "me/tiny-lt", str(out / "best")) and len(api.calls) == 2
    step = json.loads((out / "best" / "metrics.json").read_text())["step"]
    assert f"| best (step {step}, test) [paper] |" in first.out
    assert f"outputs in {out.resolve()}: all_results.json, best/" in first.out
    assert "1 resume state (step_*/)" in first.out

    second = run_cli("train_lt.py", *requeued, env=ONLINE)  # requeued: nothing to train, the push is made
    assert second.code == 0 and "nothing to train" in second.out and "pushed " in second.out
    assert [c[0] for c in api.calls[2:]] == ["create_repo", "upload_folder"]
    record = json.loads((out / "hub_push.json").read_text())
    assert (record["repo_id"], record["export"], record["commit"]) == (
        "me/tiny-lt", "best", "https://huggingface.co/me/tiny-lt/commit/abc")

    third = run_cli("train_lt.py", *requeued, env=ONLINE)  # pushed already: no upload
    assert third.code == 0 and "nothing to push" in third.out
    assert [c[0] for c in api.calls[4:]] == ["create_repo"]
    (out / "best" / "eval_test").mkdir()  # eval outputs are not pushed: still nothing to push
    assert "nothing to push" in run_cli("train_lt.py", *requeued, env=ONLINE).out
    card = out / "best" / "README.md"  # a changed card (eval_lt.py adds numbers) is pushed again
    card.write_text(card.read_text() + "\n")
    assert "pushed " in run_cli("train_lt.py", *requeued, env=ONLINE).out
    assert [c[0] for c in api.calls[5:]] == ["create_repo", "create_repo", "upload_folder"]


@pytest.mark.parametrize("offline", [True, False])
def test_a_builtin_dataset_without_files_says_what_to_pass_at_once(tmp_path, monkeypatch, offline):
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    waits = record_waits(monkeypatch)
    result = run_cli("train_lt.py", "--dataset", "cifar100_lt", "--imb", "100", "--output_dir", tmp_path / "run",
                     "--cache_dir", tmp_path / "cache", env={"HF_HUB_OFFLINE": "1"} if offline else ONLINE)
    last = result.err.strip().splitlines()[-1]
    assert result.code == 2 and "Traceback" not in result.err
    assert "--data_dir <folder with cifar-100-python/>" in last and "uoft-cs/cifar100" in last
    assert "--dataset_name" not in last and ("HF_HUB_OFFLINE is set" if offline else "cannot be reached") in last
    assert waits == []  # datasets' own requests retry after 1, 2, 4, 8, 8 s before giving up
    assert not (tmp_path / "run").exists()


def test_a_hub_model_out_of_reach_is_said_at_once(idx_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    argv = tiny_train_args(idx_dir, tmp_path / "run", "--model_name_or_path", "nobody/no-such-clip")
    waits = record_waits(monkeypatch)
    result = run_cli("train_lt.py", *argv, env=ONLINE)
    last = result.err.strip().splitlines()[-1]
    assert result.code == 2 and "Traceback" not in result.err and "Retrying" not in result.err
    assert last.startswith("error: cannot load the model 'nobody/no-such-clip': the Hub cannot be reached") \
        and "pass a local model dir as --model_name_or_path" in last
    assert waits == []  # transformers' own requests retry after 1, 2, 4, 8, 8 s
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # accelerate launch: two interpreters
def test_the_first_gpu_command_without_data_under_accelerate_launch(tmp_path):
    """The README's first GPU command with no CIFAR files and no Hub: one line saying what to pass, no retries."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "train_lt.py",
           "--dataset", "cifar100_lt", "--imb", "100", "--output_dir", str(tmp_path / "run"),
           "--cache_dir", str(tmp_path / "cache")]
    res = run_script(cmd, env={**ONLINE, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
                               "HF_HOME": str(tmp_path / "hf_home")})
    # (accelerate's launcher prints its own traceback for a child's non-zero exit; none comes from the project)
    assert res.returncode != 0 and "lt_utils/" not in res.stderr and "Retrying" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--data_dir <folder with cifar-100-python/>" in errors[0], res.stderr[-2000:]
    assert "cannot be reached: Connection refused" in errors[0] and not (tmp_path / "run").exists()
