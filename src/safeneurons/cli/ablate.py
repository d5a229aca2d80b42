"""`safeneurons ablate`: prune top, set-difference and random masks over sparsities; evaluate each."""
from __future__ import annotations

import argparse

from safeneurons.cli.options import comma_floats
from safeneurons.evaluation.evaluate import EvalConfig
from safeneurons.models.loading import ModelSource
from safeneurons.workflows.ablation import METHODS, AblationConfig, report_section, run_ablation, summarize


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from safeneurons.cli.options import add_eos_argument, add_model_arguments, add_run_arguments, add_shard_argument

    add_model_arguments(parser, "--model", deepspeed=False)  # every rank holds the whole model
    add_shard_argument(parser)  # or its block: each stage prunes its own layers, evaluation pipelined
    add_run_arguments(parser)
    parser.add_argument("--data", default="align", help="safety data for the scores (default %(default)s)")
    parser.add_argument("--utility-data", default="alpaca_cleaned_no_safety",
                        help="utility data of the set difference (default %(default)s)")
    parser.add_argument("--score-method", default="wandg", help="wandg or wanda (default %(default)s)")
    parser.add_argument("--sparsities", default="0.01,0.03,0.05",
                        help="comma list: per-row fraction (top) and p = q (set difference) (default %(default)s)")
    parser.add_argument("--selections", "--methods", dest="methods", default=",".join(METHODS),
                        help="comma list of top, setdiff, random "
                                                                      "(default %(default)s)")
    parser.add_argument("--seeds", default="0,1,2", help="random controls' seeds (default %(default)s)")
    parser.add_argument("--nsamples", type=int, default=128, help="scoring samples (default %(default)s)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per sample (default %(default)s)")
    parser.add_argument("--harmful-data", "--harmful", dest="harmful", default="advbench",
                        help="harmful prompts (default %(default)s)")
    parser.add_argument("--harmless-data", "--harmless", dest="harmless", default=None,
                        help="harmless prompts (over-refusal); default none")
    parser.add_argument("--perplexity-data", default=None, help="text set for perplexity; default none")
    parser.add_argument("--eval-limit", "--limit", dest="limit", type=int, default=100,
                        help="first N prompts of each set (default %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="new tokens per generation "
                                                                        "(default %(default)s)")
    parser.add_argument("--eval-batch-size", type=int, default=16, help="prompts per batch (default %(default)s)")
    add_eos_argument(parser)


def config_from_args(args: argparse.Namespace) -> AblationConfig:
    evaluation = EvalConfig(prompts=args.harmful, limit=args.limit, harmless=args.harmless,
                            harmless_limit=args.limit, perplexity_data=args.perplexity_data,
                            perplexity_samples=64, max_new_tokens=args.max_new_tokens,
                            batch_size=args.eval_batch_size, seed=args.seed, data_dir=args.data_dir,
                            add_eos=args.add_eos)
    seeds = tuple(int(seed) for seed in comma_floats(args.seeds, "--seeds"))
    config = AblationConfig(data=args.data, utility_data=args.utility_data, score_method=args.score_method,
                            sparsities=comma_floats(args.sparsities, "--sparsities"),
                            methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()), seeds=seeds,
                            nsamples=args.nsamples, max_length=args.max_length, seed=args.seed,
                            data_dir=args.data_dir, add_eos=args.add_eos, evaluation=evaluation)
    config.validate()
    return config


def run(args: argparse.Namespace) -> int:
    source = ModelSource(args.model, args.dtype, cache_dir=args.cache_dir, shard=args.shard, stages=args.stages)
    records = run_ablation(source, config_from_args(args), args.out)
    if records is not None:
        print(report_section(summarize(records), records[0]) + f"-> {args.out}/ablation.json, ablation.png, report.md")
    return 0
