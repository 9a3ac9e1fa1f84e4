"""Atomic writes: outputs appear whole or not at all."""
import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import UserError
from .paths import HOST as _HOST, guard_write, real, remove


@contextlib.contextmanager
def atomic_dir(final_path, overwrite=False, nbytes=None):
    """Yield a temporary sibling directory; rename it to `final_path` only if the block succeeds.

    With `overwrite`, an existing `final_path` is replaced only after the new one is complete. nbytes: the size
    expected, checked against the free space first. A full or read-only disk is one line (paths.guard_write).
    """
    final_path = Path(final_path)
    if final_path.is_symlink() and final_path.is_dir():  # a linked output folder: written where it points
        final_path = real(final_path)
    if final_path.exists() and not overwrite:
        raise UserError(f"{final_path} already exists; choose another output path or pass --overwrite")
    final_path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(final_path.parent, f"{final_path.name}.tmp-")  # left by a killed writer
    # host and pid in the name: a later writer can tell a dead writer's leftovers from a live one's
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_path.name}.tmp-{_HOST}-{os.getpid()}-", dir=final_path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs should be as readable as any new dir
    try:
        with guard_write(final_path, nbytes, cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True)):
            yield tmp
            replace_dir(tmp, final_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path, data):
    """Write bytes to `path` via a temp file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with guard_write(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------------- files
def read_json(path, what="file"):
    """A JSON file's content; a missing, unreadable or malformed file is a one-line user error."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} {path} not found; re-create it (re-export or re-build)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{what} {path} is corrupted ({err.__class__.__name__}); re-create it (re-export or "
                        "re-build)") from None
    except OSError as err:
        raise UserError(f"{what} {path} cannot be read ({err.strerror}); check the file") from None


def clean_stale_temps(folder, prefix):
    """Remove hidden temp folders `.<prefix>*` left by killed writers of this host (their process is gone)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in folder.glob(f".{prefix}*"):
        owner = _temp_owner(path.name)
        if owner is None or owner[0] != _HOST or _alive(owner[1]):
            continue
        remove(path)


def _temp_owner(name):
    m = re.search(r"\.tmp-(?P<host>[\w.-]+?)-(?P<pid>\d+)-", name)
    return (m.group("host"), int(m.group("pid"))) if m else None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_dir(src, dst):
    """Rename the finished folder `src` to `dst`, replacing an existing `dst` (renamed aside first, then removed)."""
    src, dst = Path(src), Path(dst)
    if os.path.lexists(dst):  # a symlinked step_* too: the link is moved aside and unlinked, its target kept
        old = dst.with_name(f".{dst.name}.old-{_HOST}-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            remove(old)
        os.replace(dst, old)
        try:
            os.replace(src, dst)
        except BaseException:
            os.replace(old, dst)  # the earlier output stays as it was
            raise
        with contextlib.suppress(OSError):
            remove(old)
    else:
        os.replace(src, dst)


def recorded_path(name):
    """A local file or folder as an absolute path (a record must name the same one from any working directory); a
    name that is no local path (a Hub id) as given."""
    if name is None or not os.path.exists(os.path.expanduser(str(name))):
        return name
    return os.path.abspath(os.path.expanduser(str(name)))
