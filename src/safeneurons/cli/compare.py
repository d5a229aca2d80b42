"""`safeneurons compare`: compare masks and weights before and after fine-tuning."""
from __future__ import annotations

import argparse

from safeneurons.analysis.compare import SUMMARY_FILE, CompareConfig, run_compare


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from safeneurons.cli.options import add_run_arguments

    add_run_arguments(parser, seeded=False)
    parser.add_argument("--before", required=True, help="masks before fine-tuning (mask file/folder or .pt dict)")
    parser.add_argument("--after", required=True, help="masks after fine-tuning (re-scored fine-tuned model)")
    parser.add_argument("--model-before", default=None, help="the model before fine-tuning (local folder or demo)")
    parser.add_argument("--model-after", default=None, help="the fine-tuned model folder")
    parser.add_argument("--cache-dir", default=None, help="HF cache folder for models given by id")
    parser.add_argument("--frozen-masks", default=None,
                        help="the masks that were frozen, for the weight drift (default: --before)")


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    return CompareConfig(args.before, args.after, args.frozen_masks, args.model_before, args.model_after,
                         args.cache_dir)


def run(args: argparse.Namespace) -> None:
    summary = run_compare(config_from_args(args), args.out)
    if summary is None:
        return
    overlap, jaccard = (("n/a" if summary[key] is None else f"{summary[key]:.4f}") for key in ("overlap", "jaccard"))
    print(f"safety-critical before {summary['original_safety_critical_count']}, after "
          f"{summary['new_safety_critical_count']} of {summary['total_weights']} weights; overlap {overlap}, "
          f"Jaccard {jaccard}; wrote {args.out}/{SUMMARY_FILE}")
