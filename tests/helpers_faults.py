"""Hostile-input and fault-injection helpers: tree digests, in-process CLI runs, kills at chosen write events.

A kill is a real SIGKILL of a forked child running the entry script's `main` (no cleanup handler runs, exactly as
when a job is pre-empted), at the k-th file-system write event: before and after each open-for-writing, rename,
replace and safetensors / torch save. The children are forked from a fork server: a fresh interpreter per test
process that imports the entry scripts and never runs torch itself, so each trial costs the run, not an interpreter
start (and never forks a process whose OpenMP pool is running, which can deadlock).
"""
import builtins
import hashlib
import importlib.util
import json
import os
import select
import signal
import subprocess
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
                path = os.path.join(dirpath, name)
                digest[path] = f"link {os.readlink(path)}" if os.path.islink(path) else "dir"
            for name in filenames:
                path = os.path.join(dirpath, name)
                if os.path.islink(path):  # a link is recorded, never followed (it may dangle)
                    digest[path] = f"link {os.readlink(path)}"
                    continue
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

    @staticmethod
    def import_targets():
        import accelerate.checkpointing
        import accelerate.utils.other
        import safetensors.torch
        import torch

        import lt_utils.checkpoint

    def install(self):
        """Wrap every write event's function; returns what puts the originals back (in-process use)."""
        import accelerate.checkpointing as ckpt
        import accelerate.utils.other as other
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

        targets = [(builtins, "open", opened), (os, "replace", around(os.replace)), (os, "rename", around(os.rename)),
                   (torch, "save", around(torch.save))]
        targets += [(m, "save_file", around(m.save_file)) for m in (safetensors.torch, lt_utils.checkpoint)]
        targets += [(ckpt, name, around(getattr(ckpt, name))) for name in ("safe_save_file", "save") if hasattr(ckpt, name)]
        if hasattr(other, "safe_save_file"):
            targets.append((other, "safe_save_file", around(other.safe_save_file)))
        saved = [(module, name, getattr(module, name)) for module, name, _ in targets]
        for module, name, fn in targets:
            setattr(module, name, fn)
        return lambda: [setattr(module, name, fn) for module, name, fn in saved]


class FaultSwitch(KillSwitch):
    """Counts write events; at event `fail_at` raises what a full, read-only or quota-bound disk makes the write raise
    (`fault`: an errno, or "wrapped": the text safetensors wraps ENOSPC in)."""

    def __init__(self, fail_at, fault):
        super().__init__(None)
        self.fail_at, self.fault = fail_at, fault

    def hit(self):
        self.events += 1
        if self.fail_at is not None and self.events == self.fail_at:
            if self.fault == "wrapped":
                raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
            raise OSError(self.fault, os.strerror(self.fault))  # as f.write raises it: no file named


def run_forked(cli, argv, kill_at=None, timeout=300):
    """Run the `cli` entry script's main(argv) in a child process, SIGKILLed at write event `kill_at` (None: never).
    Returns (outcome, exit code, events seen): outcome 'killed' or 'exit'."""
    server = _ForkServer.get()
    reply = server.run({"cli": cli, "kill_at": kill_at, "argv": [str(a) for a in argv]}, timeout)
    if "signal" in reply:
        assert reply["signal"] == signal.SIGKILL, f"child ended by signal {reply['signal']}"
        return "killed", None, reply["events"]
    return "exit", reply["code"], reply["events"]


class _ForkServer:
    """The interpreter that forks the children of run_forked: one per test process, started on first use."""

    _instance = None

    @classmethod
    def get(cls):
        if cls._instance is None or cls._instance.proc.poll() is not None:
            cls._instance = cls()
        return cls._instance

    def __init__(self):
        # one OpenMP thread: an import that runs a torch op (peft's) then starts no pool threads to fork over
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(REPO)]),
               "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, text=True, start_new_session=True)
        assert self._read(600) == {"ready": True}

    def run(self, request, timeout):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def _read(self, timeout):
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and a hung child
            raise TimeoutError(f"no answer from the fork server in {timeout} s")
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        return json.loads(line)


def _serve():
    """The fork server's loop: one JSON request per stdin line, one JSON reply per stdout line."""
    mains = cli_mains()
    _import_everything()  # once here, not in every child: the scripts import their stack after parsing the flags
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        events_read, events_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(events_read)
                _child(mains, request["cli"], request["kill_at"], events_write, request["argv"])
            finally:
                os._exit(70)  # never back into the server's loop
        os.close(events_write)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(events_read) as f:
            events = int(f.read() or 0)
        reply = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"code": os.WEXITSTATUS(status)}
        print(json.dumps({**reply, "events": events}), flush=True)


def _import_everything():
    """Every lt_utils module and what the kill switch wraps (importing runs no torch op: no thread pool starts)."""
    import pkgutil

    import accelerate
    import lt_utils

    for module in pkgutil.walk_packages(lt_utils.__path__, "lt_utils."):
        importlib.import_module(module.name)
    KillSwitch(None).import_targets()


def _child(mains, cli, kill_at, events_fd, argv):
    """A forked child of the server: count (and kill at) write events while main(argv) runs, its output dropped;
    the count of a run that was not killed goes to the server through `events_fd`."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    switch = KillSwitch(kill_at)
    switch.install()
    code = 0
    try:
        mains[cli](argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        code = 3
    os.write(events_fd, str(switch.events).encode())
    os._exit(code)


if __name__ == "__main__":
    _serve()
