"""Atomic writes: outputs appear whole or not at all."""
import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from .errors import UserError


@contextlib.contextmanager
def atomic_dir(final_path, overwrite=False):
    """Yield a temporary sibling directory; rename it to `final_path` only if the block succeeds.

    With `overwrite`, an existing `final_path` is replaced only after the new one is complete.
    """
    final_path = Path(final_path)
    if final_path.exists() and not overwrite:
        raise UserError(f"{final_path} already exists; choose another output path or pass --overwrite")
    final_path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(final_path.parent, f"{final_path.name}.tmp-")  # left by a killed writer
    # host and pid in the name: a later writer can tell a dead writer's leftovers from a live one's
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_path.name}.tmp-{_HOST}-{os.getpid()}-", dir=final_path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs should be as readable as any new dir
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final_path.exists():
        old = final_path.with_name(f".{final_path.name}.old-{os.getpid()}")
        os.replace(final_path, old)
        os.replace(tmp, final_path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final_path)


def atomic_write_bytes(path, data):
    """Write bytes to `path` via a temp file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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


# ------------------------------------------------------------------------------------------- paths and files
def _real(path):
    return Path(os.path.abspath(os.path.expanduser(str(path)))).resolve()


def check_outputs_apart(outputs, inputs):
    """Refuse an output path that is, contains, or lies inside an input (an overwrite would destroy the input, or
    the input would pick up the outputs). outputs / inputs: {label: path}; inputs that do not exist are skipped
    (Hub ids)."""
    for out_label, out in outputs.items():
        if out is None:
            continue
        o = _real(out)
        for in_label, inp in inputs.items():
            if inp is None or not os.path.exists(str(inp)):
                continue
            i = _real(inp)
            relation = "is" if o == i else "contains" if o in i.parents else "lies inside" if i in o.parents else None
            if relation:
                raise UserError(f"{out_label} {out} {relation} the input {in_label} {inp}; write outputs to a folder "
                                "apart from every input")


def check_writable_dir(path, label):
    """An output folder (existing or to be made) that can be written: checked before any work starts."""
    path = Path(os.path.expanduser(str(path)))
    if path.exists() and not path.is_dir():
        raise UserError(f"{label} {path} is a file, not a folder; pass a folder path")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{label} {path}: {probe} is a file, not a folder; pass a folder path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{label} {path} cannot be written ({probe} is not writable); pass a writable folder")


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
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


_HOST = re.sub(r"[^\w.-]", "_", socket.gethostname())


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
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{_HOST}-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def recorded_path(name):
    """A local file or folder as an absolute path (a record must name the same one from any working directory); a
    name that is no local path (a Hub id) as given."""
    if name is None or not os.path.exists(os.path.expanduser(str(name))):
        return name
    return os.path.abspath(os.path.expanduser(str(name)))
