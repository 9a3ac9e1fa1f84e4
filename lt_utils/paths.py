"""The one path layer of every command line's outputs.

- `expand`: `~` and `$VARS` of a path flag, expanded once when the flag is parsed (config.Flag.coerce), so the checks
  and the writers see the same path; an unset variable is refused rather than written as a literal `$NAME` folder.
- `check_output`: before any work, proves an output can be made where it is named: no dangling symlink, every name
  within the file system's length limits, and a probe folder really created and removed next to it (this catches
  read-only mounts, special file systems such as /proc, and permissions even for root). It then takes the output's
  lock (`OutputLock`): a second process on the same output is refused while the first runs.
- `check_outputs_apart`: an output never is, contains or lies inside an input, typed or recorded by an export.
- `remove`: never follows a symlink (a linked folder's content belongs to someone else).
- `guard_write`: a long write checks the free space against its size first; a full disk, a read-only remount or a too
  long name during the write becomes one line, with the caller's temp files removed (nothing partial is left).
"""
import contextlib
import errno
import fcntl
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

from .errors import UserError, at_command_end, command_running, file_system_failure

_VAR = re.compile(r"\$(\w+|\{[^}]*\})")


def expand(value):
    """`~`, `~user` and `$VAR` / `${VAR}` expanded; UserError naming an unset variable or an unknown user."""
    value = str(value)
    for match in _VAR.finditer(value):
        name = match.group(1).strip("{}")
        if name not in os.environ:
            raise UserError(f"path {value} names the unset variable ${name}; set it or write the path out")
    value = os.path.expanduser(os.path.expandvars(value))
    if value.startswith("~"):  # ~name of no user: left as is, later code would fail on it
        raise UserError(f"path {value} names the home of an unknown user {value.split('/')[0]}; write the path out")
    return value


def real(path):
    return Path(os.path.realpath(os.path.abspath(str(path))))


# --------------------------------------------------------------------------------------------- checks
def _nearest_existing(path):
    """The deepest existing ancestor of `path` (or `path`); a dangling symlink on the way is a UserError."""
    probe = path
    while not os.path.exists(probe):
        if os.path.islink(probe):
            raise UserError(f"{probe} is a symlink to {os.readlink(probe)}, which does not exist; remove the link or "
                            "pass another path")
        probe = probe.parent
    return probe


def check_output(path, label, folder=True, lock=True):
    """An output folder (or, folder=False, a file) that can be made: checked before any work starts. Returns the
    output's lock (held until the command ends: errors.cli_entry releases it) or None."""
    path = check_name_lengths(path, label)
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{label} {path} is a file, not a folder; pass a folder path")
    if not folder and path.is_dir():
        raise UserError(f"{label} {path} is a folder; pass a file path")
    if not folder and os.path.islink(path) and not path.exists():
        _nearest_existing(path)  # the dangling link's error
    existing = _nearest_existing(path if folder else path.parent)
    if not existing.is_dir():
        raise UserError(f"{label} {path}: {existing} is a file, not a folder; pass a folder path")
    try:  # permission bits do not stop root; a real folder shows what the file system allows
        os.rmdir(tempfile.mkdtemp(prefix=".lt-probe-", dir=existing))
    except OSError as err:
        raise UserError(f"{label} {path} cannot be created ({existing}: {err.strerror}); pass a writable folder") from None
    return OutputLock.acquire(path, label) if lock else None


def check_name_lengths(path, label):
    """The absolute `path`, its names and length within the limits of the file system it would be on (a longer one
    fails every later call on it, often far from here)."""
    path = Path(os.path.abspath(str(path)))
    existing = next(p for p in [path, *path.parents] if os.path.lexists(p))
    name_max, path_max = _limits(existing)
    for part in path.parts:
        if len(os.fsencode(part)) > name_max:
            raise UserError(f"{label} has a name of {len(os.fsencode(part))} bytes ({part[:24]}...); the file system "
                            f"allows {name_max}: pass a shorter name")
    # 40: the temp and lock names writers add beside an output
    if len(os.fsencode(str(path))) + 40 > path_max:
        raise UserError(f"{label} is {len(os.fsencode(str(path)))} bytes long; the file system allows {path_max - 40} "
                        "here: pass a shorter path")
    return path


def _limits(folder):
    try:
        return os.pathconf(folder, "PC_NAME_MAX"), os.pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError):
        return 255, 4096


def check_outputs_apart(outputs, inputs):
    """Refuse an output path that is, contains, or lies inside an input (an overwrite would destroy the input, or
    the input would pick up the outputs). outputs / inputs: {label: path}; inputs that do not exist are skipped
    (Hub ids). `--overwrite` never overrides this."""
    for out_label, out in outputs.items():
        if out is None:
            continue
        o = real(check_name_lengths(out, out_label))
        for in_label, inp in inputs.items():
            if inp is None or not os.path.exists(str(inp)):
                continue
            i = real(inp)
            relation = "is" if o == i else "contains" if o in i.parents else "lies inside" if i in o.parents else None
            if relation:
                raise UserError(f"{out_label} {out} {relation} the input {in_label} {inp}; write outputs to a folder "
                                "apart from every input")


# ---------------------------------------------------------------------------------------------- removal
def remove(path):
    """Remove a file, a folder tree or a symlink; a symlink is unlinked, never followed (neither is one inside)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


# ----------------------------------------------------------------------------------------------- writes
def write_failure(err, where):
    """errors.file_system_failure, and a full disk found after a write failed with a message that does not say so
    (torch.save reports only a stream position)."""
    failure = file_system_failure(err, where)
    if failure is None and not isinstance(err, OSError) and _free_bytes(where) < 1 << 20:
        failure = file_system_failure(err, where, errno.ENOSPC)
    return failure


def _free_bytes(path):
    try:
        return shutil.disk_usage(_nearest_existing(Path(os.path.abspath(str(path))))).free
    except (OSError, UserError):
        return 1 << 62


def check_free_space(where, nbytes):
    """Refuse a write of about `nbytes` (plus a tenth) that the disk holding `where` has no room for."""
    free = _free_bytes(where)
    need = int(nbytes * 1.1) + (1 << 20)
    if free < need:
        raise UserError(f"writing {where} needs about {need / 2**20:.1f} MiB but its disk has {free / 2**20:.1f} MiB "
                        "free; free space or pass an output on another disk")


@contextlib.contextmanager
def guard_write(where, nbytes=None, cleanup=None):
    """Around a write of `where`: the free space checked first (nbytes given); a file-system failure inside (see
    `write_failure`) runs `cleanup` (the temp files) and becomes one UserError line."""
    if nbytes is not None:
        check_free_space(where, nbytes)
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        failure = write_failure(err, where)
        if cleanup is not None:
            cleanup()
        if failure is None:
            raise
        raise failure from None


# ---------------------------------------------------------------------------------------------- the lock
HOST = re.sub(r"[^\w.-]", "_", socket.gethostname())


class OutputLock:
    """An exclusive flock on `.<name>.lock` beside an output, held by the main process while the command runs. The
    kernel drops it when the holder dies, so the lock of a killed run is stale by construction and simply taken."""

    def __init__(self, path, fd, made):
        self.path, self.fd, self.made = path, fd, made

    @classmethod
    def acquire(cls, output, label):
        # other ranks of a launch: the main process holds it; library calls (no command line) take none
        if int(os.environ.get("RANK", "0")) != 0 or not command_running():
            return None
        made = [p for p in [output.parent, *output.parent.parents] if not p.exists()]
        output.parent.mkdir(parents=True, exist_ok=True)
        path = output.with_name(f".{output.name}.lock")
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise UserError(f"{label} {output} is in use by {holder}; wait for it to finish or pass another "
                                f"{label}") from None
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break  # else its holder removed the file as we opened it: lock the new one
            os.close(fd)
        lock = cls(path, fd, made)
        at_command_end(lock.release)
        with contextlib.suppress(OSError):  # who holds it, for the refusal's message; a full disk may refuse it
            os.ftruncate(fd, 0)
            os.write(fd, f"process {os.getpid()} on {HOST} (since {time.strftime('%H:%M:%S')})".encode())
        return lock

    def release(self):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still held: a waiter that opened it re-checks the inode
        os.close(self.fd)
        for folder in self.made:  # folders made only for the lock, if nothing else went there
            with contextlib.suppress(OSError):
                folder.rmdir()
