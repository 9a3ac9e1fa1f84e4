"""A paper's tables as runs: each row (configs/paper_tables/<paper>.yaml) is entry-script commands (train_lt.py,
soup.py; LT-Soups' recipe as scripts/lt_soups.sh writes it), run in order, resumed when finished, and read into one
Markdown and CSV table beside the published numbers and their sources.

The data files are the one record of the rows and their published numbers; which export a paper reports is the
run's own record (its preset's `protocol`, written as `paper_row` in all_results.json), and `row_metrics` is the one
place that reads a row's numbers.
"""
import csv
import io
import os
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserError, require
from .fileio import atomic_dir, atomic_write_text, read_json

REPO_ROOT = Path(__file__).resolve().parents[1]
TABLES_DIR = REPO_ROOT / "configs" / "paper_tables"
METRICS = ("many", "medium", "few", "all")
# all_results.json's test keys of the four columns (percent)
_TEST_KEYS = {"many": "many_acc", "medium": "medium_acc", "few": "few_acc", "all": "accuracy"}
TRAIN, SOUP, RECIPE = "train_lt.py", "soup.py", "scripts/lt_soups.sh"
LAUNCHERS = ("python", "accelerate", "slurm")
RESULTS = "all_results.json"


def papers():
    """The papers with a table file (the --paper choices)."""
    return sorted(path.stem for path in TABLES_DIR.glob("*.yaml"))


@dataclass
class Command:
    script: str  # TRAIN or SOUP
    argv: list

    @property
    def output_dir(self):
        return Path(self.argv[self.argv.index("--output_dir") + 1]) if "--output_dir" in self.argv else None

    def shell(self, launcher="python"):
        prefix = {("python", TRAIN): "python", ("accelerate", TRAIN): "accelerate launch",
                  ("slurm", TRAIN): "srun accelerate launch"}.get((launcher, self.script))
        prefix = prefix or ("srun python" if launcher == "slurm" else "python")
        return f"{prefix} {self.script} {shlex.join(self.argv)}"


@dataclass
class Row:
    table: str
    name: str
    steps: dict  # {step name: command line}, in order
    published: dict
    source: str
    env: dict = field(default_factory=dict)
    commands: list = field(default_factory=list)  # planned by `plan_rows`

    @property
    def result_dir(self):
        """The run whose test metrics are the row's: the last train_lt.py command's output dir."""
        return [c for c in self.commands if c.script == TRAIN][-1].output_dir


def load_paper(paper):
    """The paper's table file, checked: {paper, title, code, tiny, tables: {id: {title, rows: [Row]}}}."""
    require(paper in papers(), f"--paper {paper} has no table file; pass one of {', '.join(papers())}")
    path = TABLES_DIR / f"{paper}.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    tables = {}
    for table_id, table in data["tables"].items():
        rows = []
        for row in table["rows"]:
            published = row.get("published") or {}
            require(set(published) == set(METRICS) and row.get("source") and row.get("steps"),
                    f"{path}: row {row.get('name')} needs steps, published {list(METRICS)} and a source")
            rows.append(Row(str(table_id), row["name"], dict(row["steps"]), published, row["source"],
                            {k: str(v) for k, v in (row.get("env") or {}).items()}))
        tables[str(table_id)] = {"title": table["title"], "rows": rows}
    return {**data, "tables": tables}


def select_tables(data, table):
    """{id: table} of the paper, or only `table` (--table)."""
    if table is None:
        return data["tables"]
    require(table in data["tables"], f"--table {table}: {data['paper']} has tables {', '.join(data['tables'])}; "
                                     "pass one of them or leave --table out for all")
    return {table: data["tables"][table]}


def plan_rows(data, tables, out_root, tiny=False, extra=()):
    """Each row's commands with their output dirs under out_root/table<id>/<row>/<step>, `extra` flags appended to
    every train_lt.py command; --tiny appends the paper's tiny overrides (`train` to every train_lt.py command,
    `scratch` to those without --init_from) and its tiny models (`models`, see `build_tiny_models`)."""
    small = (data.get("tiny") or {}) if tiny else {}
    models = {name: str(Path(out_root).resolve() / "models" / name) for name in small.get("models") or {}}
    train_extra, scratch_extra = ([_repo_path(a) for a in shlex.split(small.get(key, "").format(**models))]
                                  for key in ("train", "scratch"))
    env_extra = {k: str(v).format(**models) for k, v in (small.get("env") or {}).items()}
    for table_id, table in tables.items():
        for row in table["rows"]:
            row_dir = Path(out_root).resolve() / f"table{table_id}" / row.name
            dirs = {step: row_dir / step for step in row.steps}
            row.commands = []
            for step, line in row.steps.items():
                argv = shlex.split(line.format(**{k: str(v) for k, v in dirs.items()}))
                if argv[0] == RECIPE:
                    commands = _expand_recipe(argv, {**row.env, **env_extra}, dirs[step])
                else:
                    commands = [Command(argv[0], [*map(_repo_path, argv[1:]), "--output_dir", str(dirs[step])])]
                for command in commands:
                    if command.script == TRAIN:
                        command.argv += train_extra + ([] if "--init_from" in command.argv else scratch_extra) \
                            + list(extra)
                row.commands += commands
    return tables


def build_tiny_models(data, out_root):
    """--tiny: the paper's tiny backbones (`tiny.models`: {name: a config folder in configs/models}) with seeded random
    weights, saved once under out_root/models/<name>: every run of a row starts from the same weights, as soups need."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModel

    for name, config_dir in ((data.get("tiny") or {}).get("models") or {}).items():
        target = Path(out_root) / "models" / name
        if (target / "config.json").is_file():
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModel.from_config(AutoConfig.from_pretrained(REPO_ROOT / config_dir))
        with atomic_dir(target, overwrite=True) as tmp:  # a killed save leaves no half model behind
            model.save_pretrained(tmp)
            for path in (REPO_ROOT / config_dir).iterdir():  # the image processor
                if path.name != "config.json":
                    shutil.copy(path, tmp / path.name)


def _repo_path(token):
    """A repository path of the data (configs/..., scripts/...) made absolute: rows run from any directory."""
    return str(REPO_ROOT / token) if not token.startswith("-") and "/" in token and (REPO_ROOT / token).exists() \
        else token


def _expand_recipe(argv, env, out):
    """The commands scripts/lt_soups.sh runs, as it prints them with echo for its launchers: the recipe stays there."""
    env = {**os.environ, **{k: _repo_path(v) for k, v in env.items()}, "OUT": str(out), "LAUNCH": "echo",
           "PYTHON": "echo"}
    done = subprocess.run(["bash", str(REPO_ROOT / argv[0]), *argv[1:]], env=env, capture_output=True, text=True)
    require(done.returncode == 0, f"{argv[0]} failed: {done.stderr.strip()}")
    commands = []
    for line in done.stdout.splitlines():
        words = shlex.split(line)
        if words and words[0] in (TRAIN, SOUP):  # not its notes ("skip <dir> (done)")
            commands.append(Command(words[0], [_repo_path(w) for w in words[1:]]))
    return commands


def finished(command):
    """A train_lt.py run with its results written (a re-run skips it)."""
    return command.script == TRAIN and (command.output_dir / RESULTS).is_file()


def run_rows(tables, run):
    """Run every unfinished command, row by row; `run(command)` runs one. Returns the commands run."""
    ran = []
    for table in tables.values():
        for row in table["rows"]:
            if (row.result_dir / RESULTS).is_file():
                continue
            for command in row.commands:
                if not finished(command):
                    run(Command(command.script, command.argv + _restart_flags(command)))
                    ran.append(command)
    return ran


def _restart_flags(command):
    """An interrupted run resumes from its last resume state, else starts over (as scripts/lt_soups.sh does)."""
    if command.script != TRAIN or {"--overwrite_output_dir", "--resume_from_checkpoint"} & set(command.argv):
        return []
    if any(command.output_dir.glob("step_*")):
        return ["--resume_from_checkpoint", "latest"]
    return ["--overwrite_output_dir"] if command.output_dir.exists() else []


def row_metrics(row):
    """many/medium/few/all (percent) of a finished row: the test metrics of the row the run names as its paper's
    (`paper_row`, from its preset's --protocol); None for a row not run yet."""
    path = row.result_dir / RESULTS
    if not path.is_file():
        return None
    results = read_json(path, "results file")
    return {m: results[results["paper_row"]]["test"].get(_TEST_KEYS[m]) for m in METRICS}


def table_rows(data, table):
    """[{row, many, many_published, many_diff, ..., source}] of one table; a missing value is None."""
    out = []
    for row in table["rows"]:
        ours = row_metrics(row) or {}
        line = {"row": row.name}
        for m in METRICS:
            value, published = ours.get(m), row.published[m]
            line.update({m: value, f"{m}_published": published,
                         f"{m}_diff": None if value is None or published is None else value - published})
        out.append({**line, "source": row.source})
    return out


def _fmt(value):
    return "—" if value is None else f"{value:.2f}"


def write_tables(data, tables, out_root, launcher="python"):
    """<out_root>/table<id>.md and .csv per table; returns their paths."""
    written = []
    for table_id, table in tables.items():
        rows = table_rows(data, table)
        columns = ["row", *(f"{m}{s}" for m in METRICS for s in ("", "_published", "_diff"))]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([*columns, "source"])
        for line in rows:
            writer.writerow([*("" if line[c] is None else line[c] for c in columns), line["source"]])
        header = ["row", *(f"{m}{s}" for m in METRICS for s in ("", " (paper)", " Δ"))]
        md = [f"# {data['paper']}, table {table_id}: {table['title']}", "",
              f"{data['title']}; code {data['code']}. Top-1 test accuracy (%) of the row each run names as its "
              "paper's (`paper_row` in its all_results.json). Δ = this run − the paper; — = not run yet, or not published.", "",
              "| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
        md += ["| " + " | ".join([line["row"], *(_fmt(line[c]) for c in columns[1:])]) + " |" for line in rows]
        md += ["", "Sources:", *(f"- {line['row']}: {line['source']}" for line in rows), "", "Commands:", "", "```bash"]
        md += [c.shell(launcher) for row in table["rows"] for c in row.commands] + ["```", ""]
        base = Path(out_root) / f"table{table_id}"
        atomic_write_text(base.with_suffix(".csv"), buffer.getvalue())
        atomic_write_text(base.with_suffix(".md"), "\n".join(md))
        written += [base.with_suffix(".md"), base.with_suffix(".csv")]
    return written


def job_list(tables, launcher):
    """The commands of every row, one a line in running order, as `launcher` starts them; finished runs are listed
    commented out."""
    lines = ["#!/usr/bin/env bash", "set -euo pipefail", f"cd {shlex.quote(str(REPO_ROOT))}"]
    for table_id, table in tables.items():
        for row in table["rows"]:
            lines.append(f"# table {table_id}, row {row.name}")
            lines += [("# done: " if finished(c) else "") + c.shell(launcher) for c in row.commands]
    return "\n".join(lines) + "\n"


def check_launcher(launcher, emit):
    if launcher == "slurm" and not emit:
        raise UserError("--launcher slurm writes a job list for sbatch; add --emit")
