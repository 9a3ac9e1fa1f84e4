"""Atomic writes: outputs appear whole or not at all."""
import contextlib
import json
import os
import shutil
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_path.name}.tmp-", dir=final_path.parent))
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
