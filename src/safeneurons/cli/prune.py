"""`safeneurons prune`: zero the masked weights and save the model (remove safety-critical weights)."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from safeneurons.errors import SafeneuronsError
from safeneurons.interventions.prune import PruneConfig, run_prune

if TYPE_CHECKING:
    pass


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from safeneurons.cli.options import add_model_arguments, add_run_arguments

    add_model_arguments(parser, "--model")
    add_run_arguments(parser, seeded=False)
    parser.add_argument("--masks", required=True, help="mask file or folder (from `safeneurons score`)")
    parser.add_argument("--lowest", action="store_true",
                        help="zero the elements of the masked parameters that the mask does NOT select: with masks "
                             "of the top (1 − s) fraction, the original's pruning of the lowest-scored s")


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    if args.data_dir is not None:
        raise SafeneuronsError(f"--data-dir {args.data_dir}: prune reads no data set, only the model and the masks")
    return PruneConfig(args.model, args.masks, args.lowest, args.dtype, args.deepspeed, args.cache_dir)


def run(args: argparse.Namespace) -> int:
    result = run_prune(config_from_args(args), args.out)
    if result is not None:
        print(f"pruned {result.pruned} of {result.total} masked-parameter elements "
              f"({result.pruned / max(result.total, 1):.4%}) -> {args.out}")
    return 0
