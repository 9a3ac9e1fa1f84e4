"""scripts/reproduce.py: each paper's tables run end to end with --tiny (tiny models, real Fashion-MNIST-LT), the
tables hold the rows' own results beside the published numbers of configs/paper_tables, a rerun is a no-op; the
dry run, the job lists and the refusals; README's published numbers are the data's."""
import csv
import json
import re

import pytest
import yaml

from helpers_cli import run_cli
from helpers_train import REPO
from lt_utils.paper_tables import TABLES_DIR, papers

SCRIPT = "scripts/reproduce.py"
METRICS = {"many": "many_acc", "medium": "medium_acc", "few": "few_acc", "all": "accuracy"}


def paper_data(paper):
    return yaml.safe_load((TABLES_DIR / f"{paper}.yaml").read_text())


@pytest.fixture(scope="module")
def tiny_out(tmp_path_factory):
    return tmp_path_factory.mktemp("reproduce")


@pytest.mark.slow
@pytest.mark.parametrize("paper", ["lift", "ltsoups", "los"])
def test_tiny_runs_every_row_and_tables_carry_results_and_published_numbers(paper, tiny_out):
    result = run_cli(SCRIPT, "--paper", paper, "--tiny", "--output_dir", tiny_out)
    assert result.code == 0, result.err[-3000:]
    data, out = paper_data(paper), tiny_out / f"{paper}_tiny"
    for table_id, table in data["tables"].items():
        lines = list(csv.DictReader((out / f"table{table_id}.csv").open()))
        assert [line["row"] for line in lines] == [row["name"] for row in table["rows"]]
        markdown = (out / f"table{table_id}.md").read_text()
        for row, line in zip(table["rows"], lines):
            # the row's result: the last train_lt.py step's run (LT-Soups' recipe: its stage 2)
            last = list(row["steps"])[-1]
            run_dir = out / f"table{table_id}" / row["name"] / last / ("stage2" if last == "recipe" else "")
            results = json.loads((run_dir / "all_results.json").read_text())
            test = results[results["paper_row"]]["test"]
            assert line["source"] == row["source"] and row["source"] in markdown
            for metric, key in METRICS.items():
                ours, published = test[key], row["published"][metric]
                assert (float(line[metric]) if line[metric] else None) == ours
                assert (float(line[f"{metric}_published"]) if line[f"{metric}_published"] else None) == published
                if ours is not None and published is not None:
                    assert float(line[f"{metric}_diff"]) == pytest.approx(ours - published)
                    assert f"{published:.2f}" in markdown
                else:
                    assert line[f"{metric}_diff"] == ""
    # a rerun finds every row finished: nothing trains, no result is rewritten
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("all_results.json")}
    again = run_cli(SCRIPT, "--paper", paper, "--tiny", "--output_dir", tiny_out)
    assert again.code == 0 and "ran 0 commands" in again.out, again.err[-2000:]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("all_results.json")} == stamps
    if paper == "los":  # a run interrupted before its results: only it runs again, over its leftovers
        (out / "table1" / "cifar10_rho10" / "stage2" / "all_results.json").unlink()
        resumed = run_cli(SCRIPT, "--paper", paper, "--tiny", "--output_dir", tiny_out)
        assert resumed.code == 0 and "ran 1 commands" in resumed.out, resumed.err[-2000:]
        assert (out / "table1" / "cifar10_rho10" / "stage2" / "all_results.json").is_file()


def test_dry_run_lists_rows_and_commands(tmp_path):
    result = run_cli(SCRIPT, "--paper", "lift", "--table", "4", "--dry_run", "--output_dir", tmp_path)
    assert result.code == 0, result.err
    for rho, published in (("100", "81.7"), ("50", "83.1"), ("10", "84.9")):
        assert f"--config {REPO}/configs/lift_cifar100_lt.yaml --imb {rho} --output_dir {tmp_path}/lift/table4/rho{rho}/" \
               f"train" in result.out
        assert f"'all': {published}" in result.out
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_ltsoups_rows_are_lt_soups_sh_commands_and_extra_flags_reach_every_run(tmp_path):
    result = run_cli(SCRIPT, "--paper", "ltsoups", "--dry_run", "--output_dir", tmp_path, "--",
                     "--mixed_precision", "bf16")
    assert result.code == 0, result.err
    row = result.out.split("## lt_soups:")[1].split("##")[0].strip().splitlines()[1:]
    # the recipe's defaults: 7 factors x 2 branches, a soup per factor, the progressive soup, stage 2
    assert len(row) == 14 + 7 + 1 + 1 and row[-2].startswith("python soup.py") and "--mode progressive" in row[-2]
    assert all(line.endswith("--mixed_precision bf16") for line in row if "train_lt.py" in line)
    assert f"--init_from {tmp_path}/ltsoups/table1/lt_soups/recipe/soup" in row[-1]


def test_emit_writes_a_slurm_job_list(tmp_path):
    result = run_cli(SCRIPT, "--paper", "los", "--launcher", "slurm", "--emit", "--output_dir", tmp_path)
    assert result.code == 0, result.err
    jobs = (tmp_path / "los" / "jobs.sh").read_text().splitlines()
    runs = [line for line in jobs if line.startswith("srun accelerate launch train_lt.py")]
    assert len(runs) == 12 and sum("--init_from" in line for line in runs) == 6


@pytest.mark.parametrize("argv, message", [
    ([], "--paper is required"),
    (["--paper", "lift", "--table", "9"], "--table 9: LIFT has tables 1, 2, 3, 4, 6"),
    (["--paper", "los", "--launcher", "slurm"], "--launcher slurm writes a job list for sbatch; add --emit"),
    (["--paper", "los", "--dry_run", "--", "--imb", "nan"], "table 1, row cifar100_rho100: --imb nan is not finite"),
])
def test_refusals_are_one_line(argv, message, tmp_path):
    result = run_cli(SCRIPT, *argv, "--output_dir", tmp_path / "out")
    assert result.code == 2 and message in result.err and "Traceback" not in result.err, result.err
    assert not (tmp_path / "out").exists()


def test_readme_states_the_datas_published_numbers():
    section = (REPO / "README.md").read_text().split("## Reproduce a paper table")[1].split("\n## ")[0]
    stated = set(re.findall(r"^\| (\S+) \| (\S+) \| (\S+) \| ([\d.]+) \|", section, re.MULTILINE))
    data = set()
    for paper in papers():
        for table_id, table in paper_data(paper)["tables"].items():
            data |= {(paper, table_id, row["name"], f"{row['published']['all']}") for row in table["rows"]
                     if row["published"]["all"] is not None}
    assert stated == data and data
    # and the LIFT numbers the presets' table states are the data's
    recipes = (REPO / "README.md").read_text().split("## Paper recipes and their published numbers")[1].split("\n## ")[0]
    lift_lines = [line for line in recipes.splitlines() if line.startswith("| `configs/lift_")]
    assert {n for line in lift_lines for n in re.findall(r"\b\d+\.\d\b", line)} == \
        {number for paper, _, _, number in data if paper == "lift"}
