"""One command per paper table: run its rows (presets + overrides, configs/paper_tables/<paper>.yaml), resume the
finished ones, and write each table as Markdown and CSV beside the published numbers.

  python scripts/reproduce.py --paper lift --table 4             # LIFT's CIFAR-100-LT rows, one after another
  python scripts/reproduce.py --paper los --dry_run              # print the rows and their commands
  python scripts/reproduce.py --paper ltsoups --launcher slurm --emit   # a job list (jobs.sh) instead of running
  python scripts/reproduce.py --paper lift --tiny                # every row on tiny models and Fashion-MNIST-LT (CPU)
  python scripts/reproduce.py --paper lift --table 1 -- --data_dir /data/imagenet --train_list lists/train.txt \
      --val_list lists/val.txt --test_list lists/test.txt --class_names_file lists/classnames.txt
"""
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lt_utils.config import ArgumentParser, add_flags  # noqa: E402
from lt_utils.errors import UserError, cli_entry, require  # noqa: E402


def get_args_parser():
    parser = ArgumentParser(description="Run a paper's tables and compare them with the published numbers.")
    add_flags(parser, ("paper", "table", "tiny", "dry_run", "launcher", "emit", "output_dir"),
              output_dir="outputs/reproduce")
    parser.add_argument("train_flags", nargs="*", metavar="-- TRAIN_FLAGS",
                        help="flags for every train_lt.py command (an image root and lists, a precision), after --")
    return parser


def check_commands(tables):
    """Every row's commands parse (flags, presets, ranges) before the first one runs: a bad row stops nothing half-way."""
    import soup
    from lt_utils.config import parse_train_args

    for table in tables.values():
        for row in table["rows"]:
            for command in row.commands:
                try:
                    if command.script == "train_lt.py":
                        parse_train_args(command.argv)
                    else:
                        soup.get_args_parser().parse_args(command.argv)
                except UserError as err:
                    raise UserError(f"table {row.table}, row {row.name}: {err}") from None


def run_in_process(command):
    """An entry script's main in this process, as `python script argv` (accelerate's process state reset first)."""
    import soup
    import train_lt
    from lt_utils.training import reset_accelerate

    reset_accelerate()
    main = {"train_lt.py": train_lt.main, "soup.py": soup.main}[command.script]
    try:
        main(command.argv)
    except SystemExit as exit_:
        if exit_.code:
            raise UserError(f"{command.script} stopped (exit {exit_.code}); fix the row and rerun (finished rows are "
                            f"kept): {command.shell()}") from None


def run_launched(command, launcher):
    if subprocess.run(command.shell(launcher), shell=True).returncode:
        raise UserError(f"{command.script} failed; fix the row and rerun (finished rows are kept): "
                        f"{command.shell(launcher)}")


@cli_entry
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    from lt_utils import paper_tables as P

    require(args.paper, f"--paper is required; pass one of {', '.join(P.papers())}")
    P.check_launcher(args.launcher, args.emit)
    data = P.load_paper(args.paper)
    out_root = Path(args.output_dir) / (f"{args.paper}_tiny" if args.tiny else args.paper)
    tables = P.plan_rows(data, P.select_tables(data, args.table), out_root, tiny=args.tiny, extra=args.train_flags)
    check_commands(tables)
    if args.dry_run:
        for table_id, table in tables.items():
            print(f"# {data['paper']} table {table_id}: {table['title']}")
            for row in table["rows"]:
                print(f"## {row.name}: published {row.published} ({row.source})")
                print("\n".join(c.shell(args.launcher) for c in row.commands))
        return tables
    if args.emit:
        from lt_utils.fileio import atomic_write_text

        atomic_write_text(out_root / "jobs.sh", P.job_list(tables, args.launcher))
        print(f"wrote {out_root / 'jobs.sh'}")
        return tables
    if args.tiny:
        P.build_tiny_models(data, out_root)
    run = run_in_process if args.launcher == "python" else lambda c: run_launched(c, args.launcher)
    ran = P.run_rows(tables, run)
    written = P.write_tables(data, tables, out_root, args.launcher)
    print(f"ran {len(ran)} commands; " + ", ".join(str(p) for p in written))
    for path in written[::2]:
        print(path.read_text(encoding="utf-8"))
    return tables


if __name__ == "__main__":
    main()
