"""Hostile-input and fault-injection helpers: tree digests, in-process CLI runs, kills at chosen write events.

A kill is a real SIGKILL of a forked child running the entry script's `main` (no cleanup handler runs, exactly as
when a job is pre-empted), at the k-th file-system write event: before and after each open-for-writing, rename,
replace and safetensors / torch save. Forking the warm test process keeps each trial at the cost of the run itself.
"""
import builtins
import hashlib
import importlib.util
import os
import signal
import sys
from pathlib import Path

from helpers_train import REPO, reset_accelerate

sys.path.insert(0, str(REPO))


def tree_digest(*roots, skip=("hf_cache",)):
    """{relative path: sha256 (files) or 'dir'} of every entry under the roots, folders named in `skip` left out."""
    digest = {}
    for root in map(Path, roots):
        if not root.exists():
            digest[str(root)] = "absent"
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in skip)
            for name in dirnames:
                digest[os.path.join(dirpath, name)] = "dir"
            for name in filenames:
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    digest[path] = hashlib.sha256(f.read()).hexdigest()
    return digest


def load_build_lt():
    spec = importlib.util.spec_from_file_location("build_lt", REPO / "data_scripts" / "build_lt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_mains():
    import eval_lt
    import predict
    import soup
    import train_lt

    build_lt = load_build_lt()

    def fresh(main):
        def run(argv):
            reset_accelerate()
            return main(argv)
        return run

    return {"train": fresh(train_lt.main), "eval": fresh(eval_lt.main), "soup": fresh(soup.main),
            "build": fresh(build_lt.main), "predict": predict.main}


def one_error_line(err):
    """The single `error:` line of a refused command (asserting there is exactly one and no traceback)."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err, err[-2000:]
    assert len(errors) == 1, err[-2000:]
    return errors[0]


# ------------------------------------------------------------------------------------------------ kills
_WRITE_MODES = set("wax+")


class KillSwitch:
    """Counts write events; SIGKILLs this process at event `kill_at` (None: count only)."""

    def __init__(self, kill_at=None):
        self.kill_at, self.events = kill_at, 0

    def hit(self):
        self.events += 1
        if self.kill_at is not None and self.events >= self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def install(self):
        import safetensors.torch
        import torch

        import lt_utils.checkpoint

        def around(fn):
            def wrapped(*args, **kwargs):
                self.hit()
                result = fn(*args, **kwargs)
                self.hit()
                return result
            return wrapped

        real_open = builtins.open

        def opened(file, mode="r", *args, **kwargs):
            if isinstance(mode, str) and _WRITE_MODES & set(mode):
                self.hit()
            return real_open(file, mode, *args, **kwargs)

        builtins.open = opened
        os.replace, os.rename = around(os.replace), around(os.rename)
        torch.save = around(torch.save)
        for module in (safetensors.torch, lt_utils.checkpoint):
            module.save_file = around(module.save_file)
        import accelerate.checkpointing as ckpt

        for name in ("safe_save_file", "save"):
            if hasattr(ckpt, name):
                setattr(ckpt, name, around(getattr(ckpt, name)))
        import accelerate.utils.other as other

        if hasattr(other, "safe_save_file"):
            other.safe_save_file = around(other.safe_save_file)


def run_forked(cli, argv, kill_at=None, timeout=300):
    """Run the `cli` entry script's main(argv) in a fresh interpreter, SIGKILLed at write event `kill_at` (None:
    never). Returns (outcome, exit code, events seen): outcome 'killed' or 'exit'.

    A fresh interpreter, not a fork of the test worker: a worker that already ran torch (OpenMP pools, compile
    workers) can deadlock in a forked child."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        events_file = Path(tmp) / "events"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(REPO)])}
        proc = subprocess.run([sys.executable, __file__, cli, "-" if kill_at is None else str(kill_at),
                               str(events_file), json.dumps([str(a) for a in argv])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, timeout=timeout)
        events = int(events_file.read_text() or 0) if events_file.is_file() else 0
    if proc.returncode < 0:
        assert -proc.returncode == signal.SIGKILL, f"child ended by signal {-proc.returncode}"
        return "killed", None, events
    return "exit", proc.returncode, events


def _child(cli, kill_at, events_file, argv):
    """The fresh interpreter of run_forked: count (and kill at) write events while main(argv) runs."""
    mains = cli_mains()
    switch = KillSwitch(None if kill_at == "-" else int(kill_at))
    switch.install()
    code = 0
    try:
        mains[cli](argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        code = 3
    Path(events_file).write_bytes(str(switch.events).encode())
    os._exit(code)


if __name__ == "__main__":
    import json

    _child(sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
