"""The entry scripts run in the test process: `run_cli("train_lt.py", *argv)` does what `python train_lt.py argv...`
does from the repository root, without starting an interpreter (each start imports torch, transformers, accelerate
and datasets again: ~20 s on a busy 2-core machine; the same run in a warm process costs a second or two).

The result has the exit status and the output a subprocess would give (`.code` / `.returncode`, `.out` / `.stdout`,
`.err` / `.stderr`): a refusal is the `error:` line that `lt_utils.errors.cli_entry` prints and its SystemExit(2); a
bug is the traceback and status 1, as Python prints them. Between runs the process-wide state a fresh interpreter
would not have is reset: accelerate's state, the root logger's handlers (so `logging.basicConfig` in `main` prints
to the captured stderr, as in a subprocess), the environment, the working directory, sys.argv, torch.compile's caches
and a process group. Tests where the process itself is the point (launchers, several processes, kills, clients
without this project, `--help` imports) start real ones.
"""
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import io
import logging
import os
import sys
import traceback
from pathlib import Path

from helpers_train import QUIET_ENV, REPO, reset_accelerate


@dataclasses.dataclass
class CliResult:
    code: int
    out: str
    err: str
    value: object = None  # what main returned (None when it exited)

    # subprocess.CompletedProcess's names, so a test reads the same either way
    returncode = property(lambda self: self.code)
    stdout = property(lambda self: self.out)
    stderr = property(lambda self: self.err)


@functools.cache
def entry_main(script):
    """`main` of an entry script (a path relative to the repository), imported once per test process."""
    if script == "data_scripts/build_lt.py":  # not a package: loaded from its file
        from helpers_faults import load_build_lt

        return load_build_lt().main
    if script.startswith("scripts/"):  # not a package either
        spec = importlib.util.spec_from_file_location(Path(script).stem, REPO / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main
    return importlib.import_module(Path(script).stem).main


def run_cli(script, *argv, cwd=None, env=None):
    """`python script *argv` in this process, from `cwd` (default: the repository root) with QUIET_ENV and `env` set."""
    main = entry_main(script)
    out, err = io.StringIO(), io.StringIO()
    code, value = 0, None
    with _as_a_fresh_process(script, argv, cwd, {**QUIET_ENV, **(env or {})}):
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _root_logging():
            try:
                value = main([str(a) for a in argv])
            except SystemExit as exit_:
                code = _exit_status(exit_.code)
            except Exception:  # what the interpreter does with an uncaught exception
                traceback.print_exc()
                code = 1
    return CliResult(code, out.getvalue(), err.getvalue(), value)


def _exit_status(code):
    """The status `sys.exit(code)` gives a process (a message is printed to stderr, status 1)."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


@contextlib.contextmanager
def _as_a_fresh_process(script, argv, cwd, env):
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    restore_settings = _read_at_import(env)
    try:
        os.environ.update({k: str(v) for k, v in env.items()})
        os.chdir(cwd or REPO)
        sys.argv = [str(REPO / script), *map(str, argv)]
        reset_accelerate()
        yield
    finally:
        reset_accelerate()
        restore_settings()
        distributed = sys.modules.get("torch.distributed")
        if distributed is not None and distributed.is_available() and distributed.is_initialized():
            distributed.destroy_process_group()  # a run under a one-process rendezvous (DeepSpeed's, in-process)
        if "torch._dynamo" in sys.modules:  # compiled graphs and guards of this run's model
            sys.modules["torch._dynamo"].reset()
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


def _read_at_import(env):
    """The settings of `env` that huggingface_hub and datasets read once, when imported (so a fresh interpreter
    sees them), set on their config modules for this run; returns what puts them back."""
    import datasets.config
    import huggingface_hub.constants

    def true(name):
        return str(env[name]).upper() in ("1", "ON", "YES", "TRUE")

    values = {}
    if "HF_HUB_OFFLINE" in env:
        values[huggingface_hub.constants, "HF_HUB_OFFLINE"] = true("HF_HUB_OFFLINE")
    if "HF_HUB_OFFLINE" in env or "HF_DATASETS_OFFLINE" in env:
        offline = true("HF_DATASETS_OFFLINE" if "HF_DATASETS_OFFLINE" in env else "HF_HUB_OFFLINE")
        values[datasets.config, "HF_HUB_OFFLINE"] = values[datasets.config, "HF_DATASETS_OFFLINE"] = offline
    if "HF_DATASETS_CACHE" in env:
        values[datasets.config, "HF_DATASETS_CACHE"] = Path(env["HF_DATASETS_CACHE"])
    saved = {key: getattr(*key) for key in values}
    for (module, name), value in values.items():
        setattr(module, name, value)
    return lambda: [setattr(module, name, value) for (module, name), value in saved.items()]


@contextlib.contextmanager
def _root_logging():
    """An empty root logger, as in a fresh interpreter: `main`'s logging.basicConfig then prints to the captured
    stderr. pytest's handlers and the levels are put back afterwards."""
    root, lt = logging.getLogger(), logging.getLogger("lt")
    saved = root.handlers[:], root.level, lt.level
    root.handlers.clear()
    try:
        yield
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        lt.setLevel(saved[2])
