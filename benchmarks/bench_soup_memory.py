"""Uniform soup of N export dirs: soup.py's streaming merge vs loading every state dict first. Peak RSS and wall time.

  python benchmarks/bench_soup_memory.py                  # a 52 MB ViT (D 512, 6 layers, 224 px), N = 2, 4, 8
  python benchmarks/bench_soup_memory.py --counts 2,4,8,16 --repeats 5

Methods, each in a fresh subprocess (peak RSS is per process), timed and measured after the imports:
  make_soup     `lt_utils.soup.make_soup(inputs, out)`: what soup.py runs (headers, compatibility checks, sha256 of
                every input, tensor-by-tensor float64 merge, export dir with manifest and output hash)
  merge_only    `read_ingredient` + `merge_tensors` + `safetensors.save_file`: the streaming merge without the checks,
                hashes and export files, to compare like with like with the baselines
  load_all      the naive way: `load_file` every ingredient's model.safetensors into a list, average key by key
                (float32), `save_file`
  running_sum   model-soups' uniform-soup loop: one state dict at a time added into a running float32 average
Peak RSS growth = VmHWM at the end minus VmRSS after the imports (the high-water mark is reset there through
/proc/self/clear_refs). Each output is compared with make_soup's (max abs diff: float32 vs float64 sums).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import REPO, clock, machine, median, ratio, set_threads, write_results

METHODS = ("make_soup", "merge_only", "load_all", "running_sum")
MB = 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", default="2,4,8", help="numbers of ingredients N (comma-separated)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--num_labels", type=int, default=10)
    p.add_argument("--threads", type=int, default=1,
                   help="OMP/torch threads of the workers; 1 keeps a shared machine from stalling torch's thread pool")
    p.add_argument("--work_dir", default=None, help="where the ingredients are written (default: a temporary dir)")
    p.add_argument("--results_name", default="soup_memory")
    p.add_argument("--_worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    p.add_argument("inputs", nargs="*", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ ingredients
def write_ingredients(root, count, args):
    """`count` full fine-tuning exports of one ViT, each the base weights plus seeded noise; returns (paths, MB)."""
    from lt_utils.heads import random_head_init
    from tests.helpers_models import make_tiny_vit
    from tests.helpers_soup import perturbed, tiny_lt_model, write_ingredient

    vit = make_tiny_vit(root / "vit", image_size=args.image_size, patch_size=16, hidden=args.hidden,
                        layers=args.layers, heads=max(1, args.hidden // 64))
    lt = tiny_lt_model(vit, args.num_labels)
    state = {k: v.clone() for k, v in lt.state_dict().items()}
    head_init = random_head_init(args.num_labels, lt.spec.hidden_size, seed=7)
    paths = [write_ingredient(root / f"ingredient{i}", lt, vit, perturbed(state, state.keys(), seed=100 + i, scale=0.01),
                              head_init) for i in range(count)]
    return paths, (paths[0] / "model.safetensors").stat().st_size / MB


# ---------------------------------------------------------------------------------------------------- workers
def proc_status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak_rss():
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS (kernel >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def soup_make_soup(inputs, out):
    from lt_utils.soup import make_soup

    make_soup(inputs, out, mode="uniform", progress=False)


def soup_merge_only(inputs, out):
    from safetensors.torch import save_file

    from lt_utils.soup import merge_tensors, read_ingredient

    ingredients = [read_ingredient(p) for p in inputs]
    tensors = merge_tensors(ingredients, [0.0] + [1.0 / len(inputs)] * len(inputs), progress=False)
    save_file(tensors, str(Path(out) / "model.safetensors"))


def soup_load_all(inputs, out):
    from safetensors.torch import load_file, save_file

    state_dicts = [load_file(str(Path(p) / "model.safetensors")) for p in inputs]
    soup = {k: sum(sd[k] for sd in state_dicts) / len(state_dicts) for k in state_dicts[0]}
    save_file(soup, str(Path(out) / "model.safetensors"))


def soup_running_sum(inputs, out):
    from safetensors.torch import load_file, save_file

    soup = None
    for path in inputs:
        sd = load_file(str(Path(path) / "model.safetensors"))
        scaled = {k: v * (1.0 / len(inputs)) for k, v in sd.items()}
        soup = scaled if soup is None else {k: v + soup[k] for k, v in scaled.items()}
        del sd, scaled
    save_file(soup, str(Path(out) / "model.safetensors"))


WORKERS = {"make_soup": soup_make_soup, "merge_only": soup_merge_only, "load_all": soup_load_all,
           "running_sum": soup_running_sum}


def worker(args):
    """Runs one method in this (fresh) process; prints {"wall_s", "rss_growth_bytes", ...} as JSON."""
    import accelerate  # noqa: F401  (every method pays the same imports before the baseline)
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    import lt_utils.soup  # noqa: F401

    out = Path(args._out)
    if args._worker != "make_soup":
        out.mkdir(parents=True)
    exact = reset_peak_rss()
    baseline = proc_status("VmRSS")
    start = clock()
    WORKERS[args._worker](args.inputs, out)
    wall = clock() - start
    peak = proc_status("VmHWM")
    print(json.dumps({"wall_s": wall, "rss_growth_bytes": peak - baseline, "baseline_rss_bytes": baseline,
                      "peak_reset": exact}))


def run_worker(method, inputs, out, threads):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", method, "--_out", str(out), *map(str, inputs)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{method} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def max_abs_diff(file_a, file_b):
    from safetensors.torch import load_file

    a, b = load_file(str(file_a)), load_file(str(file_b))
    assert set(a) == set(b), "soups hold other keys"
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# ------------------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    if args._worker:
        return worker(args)
    set_threads(args.threads)  # this process builds the ingredients and compares the outputs
    counts = sorted({int(n) for n in args.counts.split(",")})
    with tempfile.TemporaryDirectory(prefix="bench_soup_", dir=args.work_dir) as tmp:
        root = Path(tmp)
        start = clock()
        paths, model_mb = write_ingredients(root, max(counts), args)
        print(f"wrote {len(paths)} ingredients of {model_mb:.1f} MB in {clock() - start:.1f}s")
        rows = [bench_count(root, paths[:n], n, model_mb, args) for n in counts]
    report(rows, model_mb)
    path = write_results(args.results_name, {"setup": {"model_mb": model_mb, "hidden": args.hidden, "layers": args.layers,
                                                       "image_size": args.image_size, "num_labels": args.num_labels,
                                                       "repeats": args.repeats, "threads": args.threads}, "rows": rows})
    print(f"wrote {path}")
    return rows


def bench_count(root, inputs, n, model_mb, args):
    runs, repeats = {m: [] for m in METHODS}, args.repeats
    for repeat in range(repeats):
        order = METHODS if repeat % 2 == 0 else METHODS[::-1]  # alternate, so load drift favours no method
        for method in order:
            runs[method].append(run_worker(method, inputs, root / f"out_{n}_{method}_{repeat}", args.threads))
    diffs = {m: max_abs_diff(root / f"out_{n}_make_soup_0" / "model.safetensors", root / f"out_{n}_{m}_0" / "model.safetensors")
             for m in METHODS if m != "make_soup"}
    for m in METHODS:
        for repeat in range(repeats):
            for f in (root / f"out_{n}_{m}_{repeat}").glob("*.safetensors"):
                f.unlink()  # keep the disk footprint at the ingredients
    growth = {m: median([r["rss_growth_bytes"] for r in runs[m]]) / MB for m in METHODS}
    wall = {m: median([r["wall_s"] for r in runs[m]]) for m in METHODS}
    row = {"num_ingredients": n, "rss_growth_mb_median": growth, "wall_s_median": wall,
           "rss_growth_in_models": {m: growth[m] / model_mb for m in METHODS},
           "memory_ratio_vs_make_soup": {m: ratio(growth[m], growth["make_soup"]) for m in METHODS},
           "time_ratio_vs_make_soup": {m: ratio(wall[m], wall["make_soup"]) for m in METHODS},
           "max_abs_diff_vs_make_soup": diffs, "peak_reset": all(r["peak_reset"] for v in runs.values() for r in v),
           "runs": runs}
    print(f"N={n}: " + "; ".join(f"{m} +{growth[m]:.0f} MB {wall[m]:.2f}s" for m in METHODS) +
          "; max abs diff vs make_soup " + ", ".join(f"{m} {d:.1e}" for m, d in diffs.items()))
    return row


def report(rows, model_mb):
    print(f"\none ingredient: {model_mb:.1f} MB of float32 tensors; {machine()}")
    print("| N | " + " | ".join(f"{m}: peak RSS growth MB (x model) / wall s" for m in METHODS) + " |")
    print("|---|" + "---|" * len(METHODS))
    for r in rows:
        cells = " | ".join(f"{r['rss_growth_mb_median'][m]:.0f} ({r['rss_growth_in_models'][m]:.1f}x) / "
                           f"{r['wall_s_median'][m]:.2f}" for m in METHODS)
        print(f"| {r['num_ingredients']} | {cells} |")


if __name__ == "__main__":
    main()
