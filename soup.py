"""Merge fine-tuned runs (train_lt.py's output dirs, or their final/ or best/ exports, local or Hub ids) into a model
soup export.

  # every run in ckpts/ (their best/ exports; --which final for final/), written to soups/uniform (printed)
  python soup.py ckpts/*
  # uniform soup (default): 1/N each
  python soup.py runs/a/final runs/b/final runs/c/final --output_dir soups/uniform
  # explicit weights (must sum to 1, or add --normalize)
  python soup.py runs/a/final runs/b/final --weights 0.25 0.75 --output_dir soups/weighted
  # LT-Soups' running merge in the given order (balance factor 1 first): soup = 0.3*soup + 0.7*next
  python soup.py runs/b1/best runs/b2/best runs/b4/best --mode progressive --lam 0.7 --output_dir soups/lt
  # greedy soup on the validation split (ranked by the stored validation score; kept on strict improvement)
  accelerate launch soup.py runs/*/best --mode greedy --output_dir soups/greedy
  # WiSE-FT: interpolate any soup toward the zero-shot model (base weights + head init)
  python soup.py runs/a/final --alpha 0.5 --output_dir soups/wiseft
  # merge task vectors (fine-tuned minus zero-shot) instead of averaging weights; the mode still sets the weights
  python soup.py runs/a/final runs/b/final runs/c/final --merge_method ties --density 0.2 --output_dir soups/ties
  python soup.py runs/a/final runs/b/final --merge_method dare_linear --density 0.3 --merge_seed 1 --output_dir soups/dare
  python soup.py runs/a/final runs/b/final --merge_method task_arithmetic --scaling 1.5 --output_dir soups/ta
  # then LT-Soups stage 2: re-train the head on the full data from the soup
  python train_lt.py --method head --init_from soups/lt --loss la --output_dir runs/stage2 ...

Every export holds its whole model (LoRA merged in), so exports of one base, architecture, labels and head init are
averaged tensor by tensor; only an anchor weight (progressive, --alpha < 1) or a task-vector merge method reads the
base model. The output is a normal export (eval_lt.py, load_export, train_lt.py --init_from) with soup_manifest.json:
inputs and their sha256, weights (anchor included), mode, merge method and its parameters, and the greedy steps.
"""
import argparse

from lt_utils.config import (DATA_INPUT_FLAGS, MERGE_PARAM_FLAGS, ArgumentParser, add_data_args, add_flags,
                             resolve_cross_flags)
from lt_utils.errors import cli_entry
from lt_utils.paths import expand


def get_args_parser():
    parser = ArgumentParser(description="Merge export dirs into a model soup (uniform, weighted, progressive, greedy; "
                                        "WiSE-FT with --alpha; task arithmetic, TIES, DARE with --merge_method).",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("ingredients", nargs="+", type=expand,
                        help="run dirs, export dirs (final/, best/) or Hub ids, in order (progressive); files and "
                             "folders without a run among them (logs, an earlier soup) are skipped with a note")
    add_flags(parser, ("which", "output_dir"), output_dir=None)
    add_flags(parser, ("mode", "weights", "normalize", "lam", "alpha", "merge_method", *MERGE_PARAM_FLAGS,
                       "select_metric", "overwrite", "push_to_hub", "hub_model_id", "hub_token"),
              aliases={"lam": ["--lambda"]})
    group = add_data_args(parser, dataset=None, num_workers=0)
    group.description = ("greedy only: the validation split; default: the split the first ingredient was trained on (its "
                         "config.json records it, and its --data_dir)")
    return parser


@cli_entry
def main(argv=None):
    args = argparse.Namespace(**resolve_cross_flags(vars(get_args_parser().parse_args(argv))))
    # torch, accelerate: imported once the flags are parsed (--help answers without them)
    from accelerate import PartialState

    from lt_utils.runs import default_soup_dir, expand_ingredients
    from lt_utils.soup import build_val_scorer, made_soup, make_soup
    from lt_utils.spec import DataSpec

    mode = args.mode or ("weighted" if args.weights is not None else "uniform")
    ingredients, notes = expand_ingredients(args.ingredients, args.which)
    if PartialState().is_main_process:
        for note in notes:
            print(note)
    name = mode if args.merge_method == "average" else f"{mode}_{args.merge_method}"
    output_dir = args.output_dir or str(default_soup_dir(name, ingredients))
    hub_repo = None
    if args.push_to_hub and PartialState().is_main_process:  # the Hub and the repo first, the merge after
        from lt_utils.hub import check_hub_push, push_repo_id

        hub_repo = check_hub_push(push_repo_id(args.hub_model_id, output_dir), args.hub_token)

    recipe = dict(mode=mode, lam=args.lam, weights=args.weights, normalize=args.normalize, alpha=args.alpha,
                  merge_method=args.merge_method, merge_flags={f: getattr(args, f) for f in MERGE_PARAM_FLAGS})
    done = made_soup(output_dir, ingredients, **recipe) if args.push_to_hub and not args.overwrite else None
    if done is not None:  # this soup exists (evaluated since, perhaps): pushed as it is
        if hub_repo is not None:
            print(f"{output_dir} holds this soup already; nothing to merge")
            push_soup(output_dir, hub_repo, args.hub_token)
        return done

    def scorer_factory(first):
        return build_val_scorer(first, DataSpec.from_values(vars(args)), batch_size=args.per_device_eval_batch_size,
                                num_workers=args.num_workers)

    manifest = make_soup(ingredients, output_dir, overwrite=args.overwrite, scorer_factory=scorer_factory,
                         select_metric=args.select_metric,
                         data_inputs={f"--{flag}": getattr(args, flag) for flag in DATA_INPUT_FLAGS}, **recipe)
    if "output_sha256" in manifest:  # main process
        merge = ", ".join(f"{k} {v}" for k, v in manifest["merge"].items() if k != "method")
        print(f"soup written to {output_dir}: anchor {manifest['anchor_weight']:.4g}, weights "
              + ", ".join(f"{w:.4g}" for w in manifest["weights"])
              + f"; merged by {manifest['merge']['method']}" + (f" ({merge})" if merge else ""))
        for name, digest in manifest["output_sha256"].items():
            print(f"sha256 {digest}  {name}")
        if hub_repo is not None:
            push_soup(output_dir, hub_repo, args.hub_token)
    return manifest


def push_soup(output_dir, repo, token):
    """The soup to the Hub, unless hub_push.json in it records this very soup (card included) pushed there."""
    from lt_utils.hub import push_once

    url = push_once(output_dir, output_dir, repo, token)
    print(f"pushed {output_dir} to https://huggingface.co/{repo} ({url})" if url else
          f"{output_dir} is on the Hub already (https://huggingface.co/{repo}); nothing to push")


if __name__ == "__main__":
    main()
