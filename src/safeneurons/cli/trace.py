"""`safeneurons trace`: model lineage by activation matching of MLP neurons."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from safeneurons.interp.tracing.assignment import DEFAULT_ALPHA, DEFAULT_BATCH_SIZE, DEFAULT_DATA, SOLVERS
from safeneurons.interp.tracing.config import TraceConfig
from safeneurons.interp.tracing.trace import run_trace
from safeneurons.models.loading import ModelSource

if TYPE_CHECKING:
    pass


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from safeneurons.cli.options import add_model_arguments, add_run_arguments, add_shard_argument

    add_model_arguments(parser, ("--model", "--base"))
    add_shard_argument(parser)  # --shard layers: both models, each stage recording and matching its own layers
    parser.add_argument("--other", required=True, help="the model tested against --model (folder, HF id, alias, demo)")
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="comma-separated data set names or files whose texts give the tokens (default %(default)s)")
    parser.add_argument("--random-tokens", action="store_true", help="uniformly random token ids instead of --data")
    parser.add_argument("--n-tokens", type=int, default=2048, help="tokens traced in all (default %(default)s)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per sequence (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="sequences per forward pass (default %(default)s)")
    parser.add_argument("--all-layers", action="store_true",
                        help="match every layer of --model against every layer of --other (pruned or deeper models)")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                        help="significance level of the aggregate p-value (default %(default)s)")
    parser.add_argument("--solver", choices=SOLVERS, default="auto",
                        help="linear assignment solver: lap (LAPJV), scipy, or auto (lap when installed) "
                             "(default %(default)s)")
    parser.add_argument("--memory-limit", type=float, default=8.0,
                        help="GiB of activations each rank keeps in memory; beyond it they spill to disk "
                             "(default %(default)s)")
    parser.add_argument("--spill-dir", default=None, help="folder for spilled activations (default: system temp)")
    add_run_arguments(parser)


def config_from_args(args: argparse.Namespace) -> TraceConfig:
    sources = [ModelSource(name, args.dtype, args.deepspeed, args.cache_dir, args.shard, args.stages)
               for name in (args.model, args.other)]
    return TraceConfig(base=sources[0], other=sources[1],
                       data=args.data, random_tokens=args.random_tokens, n_tokens=args.n_tokens,
                       max_length=args.max_length, batch_size=args.batch_size, all_layers=args.all_layers,
                       alpha=args.alpha, solver=args.solver, memory_limit_gib=args.memory_limit,
                       spill_dir=args.spill_dir, seed=args.seed, data_dir=args.data_dir)


def run(args: argparse.Namespace) -> int:
    run_trace(config_from_args(args), args.out)
    return 0
