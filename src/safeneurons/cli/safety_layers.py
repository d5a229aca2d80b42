"""`safeneurons safety-layers`: SPPFT's safety layers, written as whole-layer masks for `finetune --masks`."""
from __future__ import annotations

import argparse

from safeneurons.interp.safety_layers import DEFAULT_ONSET, SafetyLayersConfig, run_safety_layers


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from safeneurons.cli.options import add_model_arguments, add_run_arguments

    add_model_arguments(parser, "--model", deepspeed=False)
    add_run_arguments(parser, seeded=False)
    parser.add_argument("--harmful-data", required=True, help="harmful queries (advbench, demo-harmful, a file)")
    parser.add_argument("--harmless-data", required=True, help="harmless queries (demo-harmless, a file)")
    parser.add_argument("--eval-limit", "--limit", dest="limit", type=int, default=50,
                        help="queries of each set (default %(default)s)")
    parser.add_argument("--gap-onset", type=float, default=DEFAULT_ONSET,
                        help="the first safety layer is the first whose cosine gap reaches this fraction of the "
                             "largest gap (default %(default)s)")
    parser.add_argument("--eval-batch-size", "--batch-size", dest="batch_size", type=int, default=8,
                        help="queries per forward pass (default %(default)s)")


def config_from_args(args: argparse.Namespace) -> SafetyLayersConfig:
    config = SafetyLayersConfig(args.model, args.harmful_data, args.harmless_data, args.limit, args.gap_onset,
                                args.batch_size, args.dtype, args.data_dir, args.cache_dir)
    config.validate()
    return config


def run(args: argparse.Namespace) -> int:
    result = run_safety_layers(config_from_args(args), args.out)
    print(f"safety layers {result.first}-{result.last} (whole-layer masks for finetune --masks) -> {args.out}")
    return 0
