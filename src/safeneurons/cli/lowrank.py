"""`safeneurons lowrank`: remove safety-only ranks from every Linear (ActSVD)."""
from __future__ import annotations

import argparse

from safeneurons.interventions.lowrank import LowRankConfig, run_lowrank
from safeneurons.models.loading import ModelSource
from safeneurons.runtime import distributed


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from safeneurons.cli.options import add_eos_argument, add_model_arguments, add_run_arguments, add_shard_argument

    add_model_arguments(parser, "--model")
    add_shard_argument(parser)  # --shard layers: each stage the Grams and new weights of its own layers
    add_run_arguments(parser)
    parser.add_argument("--data", required=True, help="safety data (its ranks are removed)")
    parser.add_argument("--utility-data", default=None,
                        help="utility data: its top --rank-utility ranks are kept (without it: the plain variant)")
    parser.add_argument("--rank-safety", type=int, default=None, help="r_s: safety ranks removed")
    parser.add_argument("--rank-utility", type=int, default=None, help="r_u: utility ranks kept")
    parser.add_argument("--rank-neg", type=int, default=None,
                        help="the original's count: r_s = min(d_out, d_in) − rank_neg, per Linear")
    parser.add_argument("--rank-pos", type=int, default=None,
                        help="the original's count: r_u = min(d_out, d_in) − rank_pos, per Linear")
    parser.add_argument("--niter", type=int, default=None,
                        help="randomized SVD (torch.svd_lowrank) with this many power iterations (default: exact)")
    parser.add_argument("--sequential", action="store_true",
                        help="one layer at a time, later layers measured on the modified earlier ones (the original)")
    parser.add_argument("--nsamples", type=int, default=128, help="samples of each data set (default %(default)s)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per sample (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=1, help="samples per pass (default %(default)s)")
    add_eos_argument(parser)


def config_from_args(args: argparse.Namespace) -> LowRankConfig:
    return LowRankConfig(data=args.data, rank_safety=args.rank_safety, rank_utility=args.rank_utility,
                         utility_data=args.utility_data, rank_pos=args.rank_pos, rank_neg=args.rank_neg,
                         niter=args.niter, sequential=args.sequential, nsamples=args.nsamples, seed=args.seed,
                         max_length=args.max_length, batch_size=args.batch_size, data_dir=args.data_dir,
                         add_eos=args.add_eos)


def run(args: argparse.Namespace) -> int:
    source = ModelSource(args.model, args.dtype, args.deepspeed, args.cache_dir, args.shard, args.stages)
    summary = run_lowrank(source, config_from_args(args), args.out)
    if distributed.is_main():
        print(f"{summary['variant']}: removed up to {summary['removed_rank_bound']} of {summary['total_rank']} ranks "
              f"({summary['removed_fraction_bound']:.2%}) -> {args.out}")
    return 0
