"""Run folders on the command line: which export a run dir stands for (best/ or final/), how shell globs over a
folder of runs become soup ingredients, and where a soup goes when no --output_dir is given."""
import json
import logging
from pathlib import Path

from .axes import RUN_EXPORTS
from .checkpoint import CONFIG_FILE, is_export_dir
from .errors import UserError, require

logger = logging.getLogger("lt")


def run_export(path, which=None):
    """The export a RUN argument stands for: an export dir itself; a run dir's `which`/ export (default: best/,
    else final/); None when `path` is a local folder that is neither (or anything else: a file, a Hub id)."""
    path = Path(path)
    if not path.is_dir():
        return None
    if is_export_dir(path):
        return path
    for sub in (which,) if which else RUN_EXPORTS:
        if is_export_dir(path / sub):
            return path / sub
    if which and any(is_export_dir(path / sub) for sub in RUN_EXPORTS):
        raise UserError(f"{path} is a run dir without a {which}/ export; pass --which "
                        f"{'final' if which == 'best' else 'best'} or the export folder itself")
    return None


def _is_soup(export_dir):
    """Whether an export's config says soup; an unreadable or malformed one is left to the ingredient's own checks."""
    try:
        meta = json.loads((Path(export_dir) / CONFIG_FILE).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return False
    method = meta.get("method") if isinstance(meta, dict) else None
    return isinstance(method, dict) and method.get("name") == "soup"


def expand_ingredients(inputs, which=None):
    """(export dirs or Hub ids, skipped notes) for soup.py's inputs, as a shell glob like `ckpts/*` gives them.

    Run dirs become their best/ (or `which`) export. Files and folders that hold no run (logs, a results folder)
    are skipped with a note; so is an earlier soup among training runs (a glob over the runs' folder matches it),
    while soups given alone are merged. A path that does not exist is an error (a typo), as is nothing left.
    """
    picked, notes = [], []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            picked.append(item)  # a Hub id, or a typo: read_ingredient says which
            continue
        export = run_export(path, which)
        if export is None:
            kind = "a file" if path.is_file() else "a folder without best/ or final/ exports"
            notes.append(f"skipping {item}: {kind}, not a run or export dir")
            continue
        picked.append(str(export))
    local = [p for p in picked if Path(p).exists()]
    soups = [p for p in local if _is_soup(p)]
    if soups and len(soups) < len(picked):
        notes += [f"skipping {p}: a soup, not a training run (pass soups alone to merge soups)" for p in soups]
        picked = [p for p in picked if p not in soups]
    require(picked, "none of the inputs is a run dir (with best/ or final/) or an export dir; pass train_lt.py's "
                    "output folders, e.g. python soup.py ckpts/*")
    return picked, notes


def default_soup_dir(mode, ingredients, cwd=None):
    """soups/<mode> under the working directory (moved up out of any ingredient's run), suffixed _2, _3, ... rather
    than touching an existing folder."""
    owned = []
    for item in ingredients:
        path = Path(item)
        if path.exists():
            path = path.resolve()
            owned += [path] + ([path.parent] if path.name in RUN_EXPORTS else [])
    cwd = Path(cwd or Path.cwd()).resolve()
    base = cwd
    while any(base == p or p in base.parents for p in owned):
        base = base.parent
    root = base / "soups"
    candidate, n = root / mode, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{mode}_{n}"
    return candidate.relative_to(cwd) if base == cwd else candidate
