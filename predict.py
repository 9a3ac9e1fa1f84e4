"""Classify image files with an export dir (final/, best/, a soup) or a Hub model id, using transformers alone.

  python predict.py outputs/quickstart/best images/ photo.png --output preds.csv --top_k 3
  python predict.py you/lift-c100-lt images/ --output preds.csv

Writes one CSV row per image: path, top-1 label, its probability, the top-k labels and their probabilities.
"""
import argparse

from lt_utils.config import ArgumentParser, add_flags
from lt_utils.errors import cli_entry
from lt_utils.paths import expand


def get_args_parser():
    parser = ArgumentParser(description="Per-image predictions of an export or Hub model, as CSV.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model", metavar="EXPORT_OR_HUB_ID", type=expand, help="an export dir or a Hub model id")
    parser.add_argument("images", nargs="+", metavar="IMAGES_OR_DIRS", type=expand,
                        help="image files, or folders (searched recursively)")
    add_flags(parser, ("output", "top_k", "batch_size", "overwrite"))
    return parser


@cli_entry
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    from lt_utils import inference as I  # transformers, torch: once the flags are parsed (--help answers without them)

    paths = I.collect_images(args.images)
    I.check_flags(args.output, args.model, args.images, args.overwrite, args.top_k, args.batch_size)
    processor, model = I.load_classifier(args.model)
    rows = I.predict_images(processor, model, paths, batch_size=args.batch_size, top_k=args.top_k)
    I.write_csv(args.output, I.PREDICT_HEADER, rows)
    print(f"{len(rows)} predictions written to {args.output}")
    return rows


if __name__ == "__main__":
    main()
