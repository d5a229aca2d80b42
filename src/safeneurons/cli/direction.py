"""`safeneurons direction`: the refusal direction, end to end (candidates, selection, ablation, addition,
orthogonalization), as Arditi et al. 2024 and their code."""
from __future__ import annotations

import argparse

from safeneurons.interp.direction.run import RefusalDirectionConfig, run_refusal_direction
from safeneurons.evaluation.metrics import SUBSTRING_JUDGES
from safeneurons.interp.direction.selection import WHEN_ALL_DISCARDED, SelectionConfig
from safeneurons.models.loading import ModelSource


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from safeneurons.cli.options import add_model_arguments, add_run_arguments

    add_model_arguments(parser, "--model")
    add_run_arguments(parser)
    defaults, selection = RefusalDirectionConfig(), SelectionConfig()
    parser.set_defaults(seed=defaults.seed)
    parser.add_argument("--harmful-data", "--harmful", dest="harmful", default=defaults.harmful,
                        help="harmful instructions (default %(default)s)")
    parser.add_argument("--harmless-data", "--harmless", dest="harmless", default=defaults.harmless,
                        help="harmless instructions (default %(default)s)")
    parser.add_argument("--n-train", type=int, default=defaults.n_train,
                        help="prompts of each set for the candidates, drawn with --seed (default %(default)s)")
    parser.add_argument("--n-val", type=int, default=defaults.n_val,
                        help="prompts of each set for the selection (default %(default)s); the rest is held out")
    parser.add_argument("--eval-limit", type=int, default=defaults.eval_limit,
                        help="held-out prompts of each set to evaluate on (default %(default)s)")
    parser.add_argument("--no-filter-train", dest="filter_train", action="store_false",
                        help="keep every train prompt (the original keeps harmful prompts with refusal score > 0 "
                             "and harmless ones < 0)")
    parser.add_argument("--no-filter-val", dest="filter_val", action="store_false",
                        help="keep every validation prompt")
    add_selection_arguments(parser)
    parser.add_argument("--eval-batch-size", "--batch-size", dest="batch_size", type=int, default=selection.batch_size,
                        help="prompts per forward pass (default %(default)s)")
    parser.add_argument("--candidates-per-pass", type=int, default=selection.candidates_per_pass,
                        help="candidate directions scored in one forward pass (default %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                        help="greedy new tokens of the evaluation's generations (default %(default)s)")
    parser.add_argument("--compare-random", type=int, default=0, metavar="N",
                        help="also evaluate N random directions of the same norm, the control (default %(default)s)")
    parser.add_argument("--perplexity-data", default=None,
                        help="harmless text for perplexity at baseline, under ablation, subtraction and with the "
                             "orthogonalized weights (default: none)")
    parser.add_argument("--perplexity-samples", type=int, default=defaults.perplexity_samples,
                        help="texts of --perplexity-data (default %(default)s)")
    parser.add_argument("--masks", default=None,
                        help="a mask (score's masks.safetensors or folder): how the direction lies in its weights")
    parser.add_argument("--save-orthogonalized", default=None, metavar="DIR",
                        help="write the weight-orthogonalized model as an HF folder (streamed tensor by tensor)")


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """The original's filter, what happens when it keeps no candidate, and how refusal is measured and judged."""
    defaults, selection = RefusalDirectionConfig(), SelectionConfig()
    parser.add_argument("--kl-threshold", type=float, default=selection.kl_threshold,
                        help="discard candidates whose ablation moves the harmless distribution more (default "
                             "%(default)s)")
    parser.add_argument("--induce-threshold", type=float, default=selection.induce_threshold,
                        help="discard candidates whose addition induces less refusal (default %(default)s)")
    parser.add_argument("--prune-layer-fraction", type=float, default=selection.prune_layer_fraction,
                        help="discard candidates of the last fraction of layers (default %(default)s)")
    parser.add_argument("--when-all-discarded", default=selection.when_all_discarded.replace("_", "-"),
                        choices=[name.replace("_", "-") for name in WHEN_ALL_DISCARDED],
                        help="when the filter keeps no candidate: the lowest bypass among candidates with KL under "
                             "--fallback-kl-threshold (kl-bounded), stop as the original's assert does (error), or "
                             "the lowest bypass of all, whatever its KL (lowest-bypass); the report says which "
                             "(default %(default)s; choices %(choices)s)")
    parser.add_argument("--fallback-kl-threshold", type=float, default=selection.fallback_kl_threshold,
                        help="kl-bounded's looser KL bound (default %(default)s)")
    parser.add_argument("--judge", default=defaults.judge, choices=list(SUBSTRING_JUDGES),
                        help="the substring judge of the generations: the original's JailbreakBench prefixes "
                             "(jailbreakbench) or Wei et al.'s list with its 20-word rule (keyword) (default "
                             "%(default)s; choices %(choices)s)")
    parser.add_argument("--refusal-starts", nargs="+", default=list(defaults.refusal_starts), metavar="TEXT",
                        help="texts a refusal starts with; their first tokens, in context after the templated "
                             "prompt, make the refusal score (default %(default)s)")
    parser.add_argument("--perplexity-warning-factor", type=float, default=defaults.perplexity_warning_factor,
                        help="the report warns when an edit multiplies perplexity by more (default %(default)s)")


def config_from_args(args: argparse.Namespace) -> RefusalDirectionConfig:
    selection = SelectionConfig(args.kl_threshold, args.induce_threshold, args.prune_layer_fraction, args.batch_size,
                                args.candidates_per_pass, args.when_all_discarded.replace("-", "_"),
                                args.fallback_kl_threshold)
    return RefusalDirectionConfig(args.harmful, args.harmless, args.n_train, args.n_val, args.seed,
                                  args.filter_train, args.filter_val, selection, args.eval_limit,
                                  args.max_new_tokens, args.compare_random, args.perplexity_data,
                                  args.perplexity_samples, masks=args.masks,
                                  save_orthogonalized=args.save_orthogonalized, data_dir=args.data_dir,
                                  refusal_starts=tuple(args.refusal_starts), judge=args.judge,
                                  perplexity_warning_factor=args.perplexity_warning_factor)


def run(args: argparse.Namespace) -> int:
    run_refusal_direction(ModelSource(args.model, args.dtype, args.deepspeed, args.cache_dir), config_from_args(args),
                          args.out)
    return 0
