"""Rewrite an export of an earlier version (lt-export-v2: lt_model.json + lt_weights.safetensors beside
model.safetensors; lt-export-v3: config.json with the method's settings in `arch`; lt-export-v4: the validation split
recorded as "val") as the layout every command of this version reads. The old folder is only read.

  python scripts/convert_export.py outputs/run/best outputs/run/best_v5
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lt_utils.config import ArgumentParser  # noqa: E402
from lt_utils.errors import cli_entry  # noqa: E402
from lt_utils.paths import expand  # noqa: E402


def get_args_parser():
    parser = ArgumentParser(description="Convert an export of the earlier layout to this version's.")
    parser.add_argument("old_dir", metavar="OLD_DIR", type=expand, help="the export to convert (read only)")
    parser.add_argument("new_dir", metavar="NEW_DIR", type=expand, help="a new folder for the converted export")
    return parser


@cli_entry
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    from lt_utils.exports import convert_old_export

    out = convert_old_export(args.old_dir, args.new_dir)
    print(f"converted {args.old_dir} -> {out}")
    return out


if __name__ == "__main__":
    main()
