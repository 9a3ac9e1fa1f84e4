"""A generated campaign against the command lines' outputs: hostile paths x CLIs, and file-system faults x write
points. Cases are not listed one by one: each class crosses a small list of kinds with the CLIs (and, for paths, with
and without the overwrite flag, which must never change a refusal; for faults, with write events spread over each
CLI's run).

Every case is judged by the one rule in `judge`: a one-line error (exit 2, one `error:` line, no traceback) or the
correct output; every file that existed before is byte-identical unless the user named it as the output with the
overwrite flag; no temp, lock or partial output is left. Disk-full runs on a small tmpfs made here where mounting works,
else (no root) the same ENOSPC is injected at the write layer: never skipped.
"""
import contextlib
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers_cli import run_cli
from helpers_data import write_image_folder
from helpers_faults import FaultSwitch, tree_digest
from helpers_train import REPO, TINY_VIT, tiny_train_args, write_synthetic_idx

SCRIPTS = {"train": "train_lt.py", "eval": "eval_lt.py", "soup": "soup.py", "predict": "predict.py",
           "build": "data_scripts/build_lt.py"}
OVERWRITE = {"train": "--overwrite_output_dir"}  # the others: --overwrite


def _mount_tmpfs(path, size, read_only=False):
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{',ro' if read_only else ''}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("campaign")
    idx = write_synthetic_idx(root / "idx", train_per_class=30, test_per_class=4)
    cache = root / "hf_cache"
    built = root / "built"
    res = run_cli(SCRIPTS["build"], *_build_args(idx, built, cache))
    assert res.code == 0, res.err[-2000:]
    run, split_run = root / "run", root / "split_run"
    for out, data in ((run, ["--data_dir", idx]), (split_run, ["--dataset", built])):
        args = tiny_train_args(idx, out, "--max_train_steps", "1", "--eval_steps", "1", "--max_per_class", "30",
                               "--cache_dir", cache, *data)
        if out == split_run:  # a saved split fixes its images: --data_dir would contradict it
            at = args.index("--data_dir")
            del args[at:at + 2]
        res = run_cli(SCRIPTS["train"], *args)
        assert res.code == 0, res.err[-2000:]
    images = write_image_folder(root / "images", [2, 2])
    (root / "file.txt").write_text("a file")
    (root / "target").mkdir()
    os.symlink(root / "nowhere", root / "dangling")
    os.symlink(idx, root / "link_to_idx")
    ro = root / "ro"
    mounted = _mount_tmpfs(ro, "1m", read_only=True)
    try:
        yield {"root": root, "idx": idx, "cache": cache, "built": built, "run": run, "split_run": split_run,
               "images": images, "ro": ro, "ro_mounted": mounted}
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(ro)], check=True)


@pytest.fixture(scope="module")
def world_digest(world):
    """The world's files hashed once: a case that changed any of them fails (and so do the later ones)."""
    return tree_digest(world["root"], TINY_VIT)


def _build_args(idx, out, cache):
    return ["--dataset", "fashion_mnist_lt", "--data_dir", idx, "--imb", "10", "--max_per_class", "30",
            "--val_per_class", "5", "--output_dir", out, "--cache_dir", cache]


def cli_argv(cli, w, out, export=None):
    """The argv of a small real run of `cli` writing `out` (an export: the one eval, soup and predict read)."""
    final = export or w["run"] / "final"
    return {"train": lambda: tiny_train_args(w["idx"], out, "--max_train_steps", "1", "--eval_steps", "none",
                                             "--max_per_class", "30", "--cache_dir", w["cache"]),
            "eval": lambda: [final, "--output_dir", out, "--cache_dir", w["cache"]],
            "soup": lambda: [final, w["run"] / "best", "--output_dir", out],
            "predict": lambda: [final, w["images"], "--output", out],
            "build": lambda: _build_args(w["idx"], out, w["cache"])}[cli]()


def output_ok(cli, out):
    """The correct output of a finished run of `cli` at `out`."""
    out = Path(out)
    if cli == "predict":
        rows = out.read_text().splitlines()
        return rows[0].startswith("path,") and len(rows) == 5  # a header and one row per image
    need = {"train": "final/config.json", "eval": "metrics.json", "soup": "model.safetensors", "build": "lt_info.json"}
    return (out / need[cli]).is_file()


LEFTOVERS = (".tmp", ".old-", ".lock", ".lt-probe", ".staging")


def judge(res, before, roots, out, cli, expect=None, overwrite_named=False):
    """The one rule: a one-line error (containing `expect`, when given) or correct output; pre-existing files
    byte-identical unless they are the output named with the overwrite flag; no temp, lock or partial output left."""
    assert "Traceback" not in res.err, res.err[-3000:]
    after = tree_digest(*roots)
    left = [p for p in after if any(mark in Path(p).name for mark in LEFTOVERS)]
    assert not left, f"left behind: {left}"
    if res.code != 0:
        errors = [line for line in res.err.splitlines() if line.startswith("error:")]
        assert res.code == 2 and len(errors) == 1 and "; " in errors[0], res.err[-3000:]
        assert expect is None or expect in errors[0], errors[0]
        changed = {p for p in before if after.get(p) != before[p]}
        assert not changed, f"a refused or failed command changed {sorted(changed)[:5]}"
        if cli != "train":  # a failed train run may keep its complete checkpoints (it resumes from them)
            assert not set(after) - set(before) or not os.path.exists(out), f"partial output {out}"
        return errors[0]
    assert expect is None, f"expected a refusal ({expect}), got exit 0"
    assert output_ok(cli, out), f"no correct output at {out}"
    named = str(Path(out).resolve())
    changed = {p for p in before if after.get(p) != before[p] and not (overwrite_named and p.startswith(named))}
    assert not changed, f"changed {sorted(changed)[:5]}"
    return None


# ----------------------------------------------------------------------------------- paths x CLIs
LONG = "n" * 300


def path_kinds(w):
    """{kind: (output path of dir CLIs, of predict (a .csv; None: not applicable), {cli it applies to: extra argv},
    the refusal's text[, the export read])}. Every kind is refused; the overwrite flag must not change that."""
    root, idx, final = w["root"], w["idx"], w["run"] / "final"
    all_clis = dict.fromkeys(SCRIPTS, [])
    exports = {"eval": [], "soup": [], "predict": []}
    return {
        "name_too_long": (root / LONG, root / f"{LONG}.csv", all_clis, "allows 255"),
        "path_too_long": (root.joinpath(*["d" * 200] * 21), root.joinpath(*["d" * 200] * 21, "p.csv"), all_clis,
                          "bytes long"),
        "proc": (Path("/proc/lt_campaign/out"), Path("/proc/lt_campaign.csv"), all_clis, "cannot be created"),
        "sys": (Path("/sys/lt_campaign"), Path("/sys/lt_campaign.csv"), all_clis, "cannot be created"),
        "dangling_symlink": (root / "dangling", None, {k: [] for k in SCRIPTS if k != "predict"}, "does not exist"),
        "under_dangling_symlink": (root / "dangling" / "out", root / "dangling" / "p.csv", all_clis, "does not exist"),
        "under_a_file": (root / "file.txt" / "out", root / "file.txt" / "p.csv", all_clis, "is a file"),
        "is_a_file": (root / "file.txt", None, {k: [] for k in SCRIPTS if k != "predict"}, "is a file"),
        "read_only": (w["ro"] / "out", w["ro"] / "p.csv", all_clis, "cannot be created"),
        "unset_variable": ("$LT_CAMPAIGN_UNSET/out", "$LT_CAMPAIGN_UNSET/p.csv", {k: [] for k in SCRIPTS if k != "predict"},
                           "unset variable"),
        "unknown_user_home": ("~lt_campaign_nobody/out", "~lt_campaign_nobody/p.csv", all_clis, "unknown user"),
        "data_dir_typed_or_recorded": (idx, idx / "p.csv", all_clis, "data_dir"),
        "inside_data_dir": (idx / "sub", idx / "sub.csv", all_clis, "data_dir"),
        "symlink_to_data_dir": (w["root"] / "link_to_idx", w["root"] / "link_to_idx" / "p.csv", all_clis, "data_dir"),
        "dot_dot_into_data_dir": (root / "x" / ".." / idx.name / "o", root / "x" / ".." / idx.name / "p.csv", all_clis,
                                  "data_dir"),
        "contains_every_input": (root, None, {k: [] for k in SCRIPTS if k != "predict"}, "contains the input"),
        "inside_the_export": (final / "out", final / "p.csv", {**exports, "train": ["--method", "head", "--init_from", final]},
                              "lies inside the input"),
        "recorded_base_model": (TINY_VIT, TINY_VIT / "p.csv", exports, "base model"),
        "recorded_saved_split": (w["built"], w["built"] / "p.csv", exports, "saved split", w["split_run"] / "final"),
    }


def _applicable():
    """(kind, cli) pairs: the CLIs each kind applies to (a kind's table does not depend on where the world is)."""
    kinds = path_kinds({name: Path(f"/{name}") for name in ("root", "idx", "run", "split_run", "built", "ro")})
    return [(kind, cli) for kind, (dir_out, csv_out, extras, *_) in kinds.items() for cli in extras
            if (csv_out if cli == "predict" else dir_out) is not None]


PATH_CASES = [(kind, cli, over) for kind, cli in _applicable() for over in (False, True)]


def _read_only(w):
    """A read-only folder: the tmpfs mounted read-only, else (no mount allowed) mkdir there fails with EROFS."""
    if w["ro_mounted"]:
        return contextlib.nullcontext()
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if str(path).startswith(str(w["ro"])):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    return _patched(os, "mkdir", mkdir)


@contextlib.contextmanager
def _patched(module, name, fn):
    saved = getattr(module, name)
    setattr(module, name, fn)
    try:
        yield
    finally:
        setattr(module, name, saved)


@pytest.mark.parametrize("kind, cli, overwrite", PATH_CASES,
                         ids=[f"{k}-{c}-{'overwrite' if o else 'plain'}" for k, c, o in PATH_CASES])
def test_paths_x_clis(world, world_digest, kind, cli, overwrite):
    dir_out, csv_out, extras, expect, *export = path_kinds(world)[kind]
    out = csv_out if cli == "predict" else dir_out
    argv = cli_argv(cli, world, out, *export) + extras[cli] + ([OVERWRITE.get(cli, "--overwrite")] if overwrite else [])
    roots = [world["root"], TINY_VIT]
    before = world_digest
    with _read_only(world):
        res = run_cli(SCRIPTS[cli], *argv)
    judge(res, before, roots, out, cli, expect)
    assert not (REPO / "$LT_CAMPAIGN_UNSET").exists()


@pytest.mark.parametrize("cli", ["build", "predict", "soup"])
@pytest.mark.parametrize("how", ["tilde", "variable"])
def test_home_and_variables_expand_once(world, tmp_path, cli, how):
    """`~` and `$VAR` reach the writer expanded (a preset's `~/x` once made a literal `./~/x`)."""
    home = tmp_path / "home"
    home.mkdir()
    out = ("~" if how == "tilde" else "$LT_CAMPAIGN_HOME") + ("/p.csv" if cli == "predict" else "/out")
    before = tree_digest(world["root"])
    res = run_cli(SCRIPTS[cli], *cli_argv(cli, world, out), env={"HOME": home, "LT_CAMPAIGN_HOME": home})
    judge(res, before, [world["root"]], home / out.split("/", 1)[1], cli)
    assert not (REPO / "~").exists() and not (REPO / "$LT_CAMPAIGN_HOME").exists()


@pytest.mark.parametrize("cli", ["eval", "soup", "predict"])
@pytest.mark.parametrize("how", ["tilde", "variable"])
def test_home_and_variables_expand_in_positional_inputs(world, tmp_path, cli, how):
    """The exports and images named as positional arguments are expanded as the flags' paths are (a quoted `~/run`
    or `$RUNS/run` from a job script)."""
    home = ("~" if how == "tilde" else "$LT_CAMPAIGN_HOME") + "/"
    out = tmp_path / ("p.csv" if cli == "predict" else "out")
    argv = [home + str(Path(a).relative_to(world["root"])) if Path(str(a)).is_relative_to(world["root"])
            and str(a) in map(str, (world["run"] / "final", world["run"] / "best", world["images"])) else a
            for a in cli_argv(cli, world, out)]
    assert sum(str(a).startswith(home) for a in argv) == {"eval": 1, "soup": 2, "predict": 2}[cli]
    before = tree_digest(world["root"])
    res = run_cli(SCRIPTS[cli], *argv, env={"HOME": world["root"], "LT_CAMPAIGN_HOME": world["root"]})
    assert res.code == 0, res.err[-2000:]
    judge(res, before, [world["root"]], out, cli)


def test_preset_tilde_output_dir_trains_into_home(world, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    preset = tmp_path / "preset.yaml"
    preset.write_text("output_dir: ~/runs/x\n")
    argv = [a for a in cli_argv("train", world, "unused") if a != "unused"]
    argv.remove("--output_dir")
    before = tree_digest(world["root"])
    res = run_cli(SCRIPTS["train"], "--config", preset, *argv, env={"HOME": home})
    judge(res, before, [world["root"]], home / "runs" / "x", "train")
    assert not (REPO / "~").exists()


def test_overwrite_of_a_run_with_a_symlinked_checkpoint_keeps_the_link_target(world, tmp_path):
    """--overwrite_output_dir once followed a symlinked step_* into its target, removed half the run, then crashed."""
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    res = run_cli(SCRIPTS["train"], *cli_argv("train", world, out), "--checkpointing_steps", "1")
    assert res.code == 0, res.err[-2000:]
    os.replace(out / "step_1", elsewhere)
    os.symlink(elsewhere, out / "step_1")
    kept = tree_digest(elsewhere)
    res = run_cli(SCRIPTS["train"], *cli_argv("train", world, out), "--overwrite_output_dir")
    assert res.code == 0, res.err[-2000:]
    assert tree_digest(elsewhere) == kept and not (out / "step_1").exists() and output_ok("train", out)


def test_an_empty_split_is_refused_before_an_earlier_run_is_removed(world, tmp_path):
    """--overwrite_output_dir with data whose test split turns out empty once deleted the finished run, then crashed
    in torch.cat. (An empty val split is a run that keeps final/ only.)"""
    out = tmp_path / "run"
    res = run_cli(SCRIPTS["train"], *cli_argv("train", world, out))
    assert res.code == 0, res.err[-2000:]
    no_test = write_synthetic_idx(tmp_path / "no_test", train_per_class=30, test_per_class=0)
    before = tree_digest(tmp_path)
    res = run_cli(SCRIPTS["train"], *cli_argv("train", world, out), "--data_dir", no_test, "--overwrite_output_dir")
    judge(res, before, [tmp_path], out, "train", "test")


# ----------------------------------------------------------------------------------- faults x write points
FAULTS = {"ENOSPC": errno.ENOSPC, "EROFS": errno.EROFS, "EDQUOT": errno.EDQUOT, "wrapped_ENOSPC": "wrapped"}
# write events per CLI at which to fail, as fractions of a clean run's events (first, thirds, last); the cheap CLIs
# get every fault, train fewer (eval's one write point is the full-disk case below)
POINTS = (0.0, 1 / 3, 2 / 3, 1.0)
FAULT_PLAN = {"train": (("ENOSPC",), POINTS), "soup": (tuple(FAULTS), (1 / 3, 1.0)),
              "build": (tuple(FAULTS), (1 / 3, 1.0)), "predict": (("ENOSPC", "EROFS", "EDQUOT"), (0.0, 1.0))}
FAULT_CASES = [(cli, fault, point) for cli, (faults, points) in FAULT_PLAN.items() for fault in faults for point in points]


@pytest.fixture(scope="module")
def write_events(world, tmp_path_factory):
    """{cli: write events of a clean run} (each counted once, in a run that also proves the CLI works here)."""
    counts = {}
    for cli in FAULT_PLAN:
        out = tmp_path_factory.mktemp("count") / f"count_{cli}" / ("p.csv" if cli == "predict" else "out")
        out.parent.mkdir()
        switch = FaultSwitch(None, None)
        restore = switch.install()
        try:
            res = run_cli(SCRIPTS[cli], *cli_argv(cli, world, out))
        finally:
            restore()
        assert res.code == 0 and output_ok(cli, out), res.err[-2000:]
        counts[cli] = switch.events
    return counts


@pytest.mark.parametrize("cli, fault, point", FAULT_CASES, ids=[f"{c}-{f}-{p:.2f}" for c, f, p in FAULT_CASES])
def test_faults_x_write_points(world, world_digest, write_events, tmp_path, cli, fault, point):
    at = max(1, round(point * (write_events[cli] - 1)))  # the last event follows the last write: nothing can fail there
    out = tmp_path / ("p.csv" if cli == "predict" else "out")
    roots = [world["root"], TINY_VIT, tmp_path]
    before = {**world_digest, **tree_digest(tmp_path)}
    switch = FaultSwitch(at, FAULTS[fault])
    restore = switch.install()
    try:
        res = run_cli(SCRIPTS[cli], *cli_argv(cli, world, out))
    finally:
        restore()
    line = judge(res, before, roots, out, cli, expect=None)
    assert switch.events >= at and line is not None, "the fault did not fire or was swallowed"
    assert os.strerror(errno.ENOSPC if fault == "wrapped_ENOSPC" else FAULTS[fault]) in line, line


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs filled up; where mounting is impossible, writes under it fail with an injected ENOSPC."""
    disk = tmp_path / "disk"
    if _mount_tmpfs(disk, "1m"):
        try:
            with open(disk / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 4096)
            yield disk, contextlib.nullcontext()
        finally:
            subprocess.run(["umount", "-l", str(disk)], check=True)  # lazy: a file object a traceback still holds
        return
    real_open = open

    def opened(file, mode="r", *args, **kwargs):
        if str(file).startswith(str(disk)) and set(mode) & set("wax+"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(file, mode, *args, **kwargs)

    import builtins

    yield disk, _patched(builtins, "open", opened)


@pytest.mark.parametrize("cli", list(SCRIPTS))
def test_full_disk_is_one_line_and_leaves_nothing(world, full_disk, cli):
    disk, injected = full_disk
    out = disk / ("p.csv" if cli == "predict" else "out")
    roots = [world["root"], disk]
    before = tree_digest(*roots)
    with injected:
        res = run_cli(SCRIPTS[cli], *cli_argv(cli, world, out))
    line = judge(res, before, roots, out, cli)
    assert line is not None and ("No space left" in line or "free" in line), line


# ----------------------------------------------------------------------------------- the run-folder lock
HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from lt_utils.errors import cli_entry
    from lt_utils.paths import check_output

    @cli_entry
    def main():
        check_output({out!r}, "--output_dir")
        print("locked", flush=True)
        time.sleep(600)

    main()
""")


def test_a_second_process_is_refused_and_a_killed_holders_lock_is_taken_over(world, tmp_path):
    """A real process holds --output_dir through the path layer; train_lt.py on the same folder is refused in one line
    naming it, the folder untouched. Killed (SIGKILL: no cleanup runs), its stale lock file is taken over."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(repo=str(REPO), out=str(out))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = tree_digest(tmp_path)
        res = run_cli(SCRIPTS["train"], *cli_argv("train", world, out))
        assert "Traceback" not in res.err and res.code == 2, res.err[-2000:]
        assert f"is in use by process {holder.pid}" in res.err and tree_digest(tmp_path) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".run.lock").exists()  # stale: no process holds it
    res = run_cli(SCRIPTS["train"], *cli_argv("train", world, out))
    assert res.code == 0 and output_ok("train", out), res.err[-2000:]
    assert not (tmp_path / ".run.lock").exists()


@pytest.mark.slow  # a real train_lt.py process (its imports: ~15 s)
def test_two_train_runs_on_one_output_dir(world, tmp_path):
    """Two identical runs started into one --output_dir once crashed each other. The first, a real process, is
    frozen (SIGSTOP) as soon as it holds the folder; the second is refused in one line, nothing touched. The first
    killed (SIGKILL: no cleanup runs), the requeued run takes its stale lock over and trains."""
    out = tmp_path / "run"
    argv = [str(a) for a in cli_argv("train", world, out)]
    first = subprocess.Popen([sys.executable, str(REPO / "train_lt.py"), *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    lock = tmp_path / ".run.lock"
    try:
        while not (lock.exists() and lock.read_text().startswith("process")):  # its imports, then the lock
            assert first.poll() is None, first.stderr.read()[-2000:]
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)
        before = tree_digest(tmp_path)
        res = run_cli(SCRIPTS["train"], *argv)
        assert res.code == 2 and "Traceback" not in res.err and f"in use by process {first.pid}" in res.err, res.err
        assert tree_digest(tmp_path) == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert lock.exists()  # stale: its holder is gone
    res = run_cli(SCRIPTS["train"], *argv, *(["--overwrite_output_dir"] if out.exists() else []))
    assert res.code == 0 and output_ok("train", out), res.err[-2000:]
    assert not lock.exists()
