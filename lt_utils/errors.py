"""User-facing errors: one line, the problem and the fix, a non-zero exit, no traceback."""
import errno
import functools
import os
import re
import sys

# a Hugging Face token typed where a flag name or value was expected (`--hub-token hf_...`) must not reach job logs
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{8,}")


def redact(text):
    """`text` with every Hugging Face token replaced by `hf_<hidden>`."""
    return _HF_TOKEN.sub("hf_<hidden>", text)


class UserError(Exception):
    """Bad input from the user (flags, paths, files). Printed as one line; exit status 2."""


def require(condition, message):
    if not condition:
        raise UserError(message)


def first_line(err, limit=300):
    """The first line of a library's error (transformers', huggingface_hub's span lines), for a one-line UserError;
    its class name when it says nothing."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


# what the file system refused, in words: such a failure is the user's to fix, wherever it happened
_SPACE = "free space or pass an output on another disk, then run again"
FILE_SYSTEM_ERRNOS = {errno.ENOSPC: ("the disk is full", _SPACE), errno.EDQUOT: ("the disk quota is exceeded", _SPACE),
                      errno.EFBIG: ("a file is too large for the file system", _SPACE),
                      errno.EROFS: ("the file system is read-only", "pass an output on a writable file system"),
                      errno.ENAMETOOLONG: ("a name is too long", "pass a shorter output path")}


def file_system_failure(err, where, code=None):
    """The UserError of a write to `where` the file system refused (FILE_SYSTEM_ERRNOS; `code` when known otherwise),
    else None. torch and safetensors wrap the OSError in their own exceptions: its text tells."""
    code = code or getattr(err, "errno", None)
    if code not in FILE_SYSTEM_ERRNOS:
        text = str(err)
        code = next((c for c in FILE_SYSTEM_ERRNOS if os.strerror(c) in text or f"os error {c})" in text), None)
    if code is None:
        return None
    problem, fix = FILE_SYSTEM_ERRNOS[code]
    return UserError(f"writing {where} failed: {problem} ({os.strerror(code)}); nothing was kept. {fix[0].upper()}{fix[1:]}")


_AT_END = []  # what a command holds until it ends (the outputs' locks)
_RUNNING = []  # the commands running in this process (run in-process, a command may call none or one)


def command_running():
    return bool(_RUNNING)


def at_command_end(release):
    """Run `release` when the command running ends."""
    _AT_END.append(release)


def cli_entry(main):
    """Wrap a script's `main` so a UserError ends the process with one line on stderr and exit 2 (tokens hidden).

    A write the file system refused (full, read-only, a name too long) is such a line too, wherever it happened.
    Anything else is a bug in this project and keeps its traceback. The outputs' locks are released at the end.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        _RUNNING.append(main)
        try:
            check_launch_world_size(os.environ)
            return main(*args, **kwargs)
        except UserError as err:
            _refuse(err)
        except Exception as err:  # libraries wrap the OSError of a full disk in their own exceptions
            failure = file_system_failure(err, getattr(err, "filename", None) or "an output")  # f.write names no file
            if failure is None:
                raise
            _refuse(failure)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        finally:
            _RUNNING.pop()
            while _AT_END and not _RUNNING:
                _AT_END.pop()()

    def console():
        """An installed command (pyproject's [project.scripts]): exit status 0, whatever `main` returns (the console
        script would print a returned value and exit with status 1)."""
        wrapper()

    wrapper.console = console
    return wrapper


# where a launcher puts the world size: torchrun, then the MPI flavours accelerate also reads
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def check_launch_world_size(env):
    """accelerate's one-process launcher (the path of --cpu, and of a config without a distributed type) sets
    ACCELERATE_USE_CPU always, and MASTER_ADDR/MASTER_PORT only when the config asks for several processes or
    machines, yet starts this process alone and gives it no world size: it would train at a fraction of the global
    batch, or as independent runs writing into one folder. Refuse before any work."""
    if "ACCELERATE_USE_CPU" not in env or not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
        return
    if any(env.get(name) for name in WORLD_SIZE_VARS):
        return
    raise UserError(f"`accelerate launch` started this process alone, but set up a rendezvous at {env['MASTER_ADDR']}:"
                    f"{env['MASTER_PORT']} because its config asks for several processes or machines (--cpu and "
                    "distributed_type NO start one); drop --cpu (without a GPU the multi-GPU and DeepSpeed configs "
                    "start their processes on CPU), or pass --num_processes 1 --num_machines 1 for one process "
                    "(or unset MASTER_ADDR/MASTER_PORT if your shell set them)")


def _refuse(err):
    print(f"error: {redact(str(err))}", file=sys.stderr)
    sys.exit(2)
