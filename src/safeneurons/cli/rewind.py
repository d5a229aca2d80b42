"""`safeneurons rewind`: set the masked weights of a fine-tuned model back to the original's."""
from __future__ import annotations

import argparse

from safeneurons.interventions.rewind import RewindConfig, run_rewind


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from safeneurons.cli.options import add_run_arguments

    add_run_arguments(parser, seeded=False)
    parser.add_argument("--original", required=True, help="the model before fine-tuning (folder, HF id or demo)")
    parser.add_argument("--finetuned", required=True, help="the fine-tuned model (folder or HF id)")
    parser.add_argument("--masks", required=True, help="mask file or folder: the elements to set back")
    parser.add_argument("--cache-dir", default=None, help="HF cache folder for model ids")


def config_from_args(args: argparse.Namespace) -> RewindConfig:
    return RewindConfig(args.original, args.finetuned, args.masks, args.cache_dir)


def run(args: argparse.Namespace) -> int:
    result = run_rewind(config_from_args(args), args.out)
    if result is not None:
        print(f"rewound {result.rewound} elements of {len(result.per_tensor)} tensors to the original's values "
              f"-> {args.out}")
    return 0
