"""What the benchmarks share: the repo on sys.path, a clock, medians, the machine line, the results file."""
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def clock():
    return time.perf_counter()


def median(values):
    return statistics.median(values)


def machine():
    """The facts a reader needs to compare numbers: cores, threads, library versions, load at start."""
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg_1min": os.getloadavg()[0],
    }


def set_threads(threads):
    """Pin torch's intra-op threads (0: leave torch's default), so repeated runs compare like with like."""
    import torch

    if threads:
        torch.set_num_threads(threads)


def write_results(name, payload, out_dir=None):
    """benchmarks/results/<name>.json (atomic), with the machine facts; returns the path."""
    from lt_utils.fileio import atomic_write_json

    path = Path(out_dir or RESULTS_DIR) / f"{name}.json"
    atomic_write_json(path, {"benchmark": name, "machine": machine(), **payload})
    return path


def ratio(baseline, candidate):
    """How many times faster (or smaller) the candidate is: baseline / candidate."""
    return baseline / candidate if candidate > 0 else float("inf")
