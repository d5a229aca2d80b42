"""`safeneurons score`: find safety-critical weights or neurons (wanda, wandg, random)."""
from __future__ import annotations

import argparse

from safeneurons.models.loading import ModelSource
from safeneurons.runtime import distributed
from safeneurons.runtime.memory import parse_memory_size
from safeneurons.scores.sizes import ACCUMULATE_DTYPES
from safeneurons.scores.config import DEFAULT_SPARSITY, DEFAULT_UTILITY_DATA, METHODS, SETDIFF_SCOPES, ScoreConfig
from safeneurons.scores.run import run_score


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from safeneurons.cli.options import add_eos_argument, add_model_arguments, add_run_arguments, add_shard_argument

    add_model_arguments(parser, "--model")
    add_shard_argument(parser)
    add_run_arguments(parser)
    parser.add_argument("--score-method", "--method", dest="method", required=True,
                        metavar="{" + ",".join(METHODS) + "}",
                        help="wanda (|W|·activation norm), wandg (|W|·Σ per-sample |gradient|, SNIP) or random")
    parser.add_argument("--data", required=True,
                        help="safety data: a name (align, align_short, demo-align, …) or a file")
    parser.add_argument("--sparsity-ratio", type=float, default=DEFAULT_SPARSITY,
                        help="fraction selected per output row (weight), of the rows (neuron) or of the heads (head), "
                             "in (0, 1); the set difference selects by --p/--q instead (default %(default)s, the "
                             "original extension's)")
    parser.add_argument("--granularity", default="weight",
                        help="weight (top per row), neuron (whole rows) or head (whole attention heads) "
                             "(default %(default)s)")
    parser.add_argument("--utility-data", default=None,
                        help=f"utility data of the set difference (default {DEFAULT_UTILITY_DATA} with --p/--q)")
    parser.add_argument("--p", type=float, default=None,
                        help="set difference: minus the top-p fraction by utility score, p in (0, 1]")
    parser.add_argument("--q", type=float, default=None,
                        help="set difference: the top-q fraction by safety score, q in (0, 1]")
    parser.add_argument("--setdiff-scope", default="matrix", choices=SETDIFF_SCOPES,
                        help="set difference per flattened matrix (the original code) or per output row (the paper's "
                             "description; its issue #14) (default %(default)s)")
    parser.add_argument("--nsamples", type=int, default=128, help="samples drawn with --seed (default %(default)s)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per sample (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="samples per pass; statistics stay per sample (default %(default)s)")
    parser.add_argument("--score-memory", default="auto", metavar="SIZE",
                        help="wandg: memory per rank for the local sums of |gradient| (e.g. 8GiB, 512MiB); "
                             "all Linears at once when they fit, else in rounds that fit, each running the passes "
                             "again (default auto: half of what the rank can still allocate)")
    parser.add_argument("--accumulate-dtype", default=ScoreConfig.accumulate_dtype, choices=ACCUMULATE_DTYPES,
                        help="how per-sample statistics are summed: fixed (one int64 word a weight, each term "
                             "truncated to a unit per row set from the first sample, rounded once to fp32: the same "
                             "masks bit for bit at any rank count and batch size), exact (the same, every term "
                             "exact, 16 bytes a weight), float32 (4 bytes; the last bits depend on the rank count) "
                             "or model (wandg only: in the model's dtype, as the original code's gradient buffers "
                             "under bf16) (default %(default)s)")
    parser.add_argument("--sequential", action="store_true",
                        help="the original layer-by-layer schedule: later layers scored with earlier selections zeroed")
    parser.add_argument("--save-scores", action="store_true", help="also write the raw scores (float32)")
    add_eos_argument(parser)


def config_from_args(args: argparse.Namespace) -> ScoreConfig:
    return ScoreConfig(method=args.method, data=args.data, sparsity_ratio=args.sparsity_ratio,
                       nsamples=args.nsamples, seed=args.seed, max_length=args.max_length,
                       granularity=args.granularity, utility_data=args.utility_data, p=args.p, q=args.q,
                       sequential=args.sequential, data_dir=args.data_dir, keep_scores=args.save_scores,
                       batch_size=args.batch_size, add_eos=args.add_eos,
                       score_memory=parse_memory_size(args.score_memory, "--score-memory"),
                       setdiff_scope=args.setdiff_scope, accumulate_dtype=args.accumulate_dtype)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    source = ModelSource(args.model, args.dtype, args.deepspeed, args.cache_dir, args.shard, args.stages)
    result = run_score(source, config, args.out, args.save_scores)
    if distributed.is_main():
        summary = result.summary
        print(f"{config.method}: selected {summary['total_selected']} of {summary['total_scored']} weights "
              f"({summary['selected_fraction']:.4%}) -> {args.out}")
    return 0
