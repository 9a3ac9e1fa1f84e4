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

from helpers_train import REPO

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


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def load_build_lt():
    spec = importlib.util.spec_from_file_location("build_lt", REPO / "data_scripts" / "build_lt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_mains():
    import eval_lt
    import soup
    import train_lt

    build_lt = load_build_lt()

    def fresh(main):
        def run(argv):
            reset_accelerate()
            return main(argv)
        return run

    return {"train": fresh(train_lt.main), "eval": fresh(eval_lt.main), "soup": fresh(soup.main),
            "build": fresh(build_lt.main)}


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


def run_forked(fn, kill_at=None, timeout=300):
    """Run fn() in a forked child, killed at write event `kill_at` (None: never). Returns (outcome, exit code, events
    seen): outcome 'killed' or 'exit'. The child ends itself (SIGALRM) after `timeout` seconds."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no return from here
        code = 0
        try:
            os.close(read_fd)
            signal.alarm(timeout)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            switch = KillSwitch(kill_at)
            switch.install()
            try:
                fn()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            os.write(write_fd, str(switch.events).encode())
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    os.close(write_fd)
    _, status = os.waitpid(pid, 0)
    events = int(os.read(read_fd, 64).decode() or 0)
    os.close(read_fd)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL, f"child ended by signal {os.WTERMSIG(status)} (timeout?)"
        return "killed", None, events
    return "exit", os.WEXITSTATUS(status), events
