"""User-facing errors: one line, the problem and the fix, a non-zero exit, no traceback."""
import errno
import functools
import os
import sys


class UserError(Exception):
    """Bad input from the user (flags, paths, files). Printed as one line; exit status 2."""


def require(condition, message):
    if not condition:
        raise UserError(message)


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
    """Wrap a script's `main` so a UserError ends the process with one line on stderr and exit 2.

    A write the file system refused (full, read-only, a name too long) is such a line too, wherever it happened.
    Anything else is a bug in this project and keeps its traceback. The outputs' locks are released at the end.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        _RUNNING.append(main)
        try:
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

    return wrapper


def _refuse(err):
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
