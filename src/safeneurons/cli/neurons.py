"""`safeneurons neurons`: are the neurons our scores select the ones that carry refusal? Each ranking's top k% of
every layer's MLP neurons patched during generation between an aligned model and its base, in both directions,
against random neurons (Chen et al. 2024's safety neurons)."""
from __future__ import annotations

import argparse

from safeneurons.cli.options import comma_floats
from safeneurons.interp.neurons.rankings import WEIGHT_METHODS
from safeneurons.interp.neurons.run import run_neuron_study
from safeneurons.interp.neurons.study import DEFAULT_FRACTIONS, RANKINGS, NeuronStudyConfig
from safeneurons.models.loading import ModelSource


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from safeneurons.cli.options import add_eos_argument, add_model_arguments, add_run_arguments

    add_model_arguments(parser, "--model", deepspeed=False)
    add_run_arguments(parser)
    defaults = NeuronStudyConfig()
    parser.add_argument("--base-model", required=True,
                        help="the unaligned base model the aligned --model was trained from (same structure and "
                             "tokenizer)")
    parser.add_argument("--harmful-data", "--prompts", dest="prompts", default=defaults.prompts,
                        help="held-out harmful prompts, judged by the keyword judge (default %(default)s)")
    parser.add_argument("--eval-limit", "--limit", dest="limit", type=int, default=defaults.limit,
                        help="first N prompts (default %(default)s)")
    parser.add_argument("--data", dest="safety_data", default=defaults.safety_data,
                        help="safety data of the weight scores; its prompts are the activation contrast's "
                             "(default %(default)s)")
    parser.add_argument("--utility-data", default=defaults.utility_data,
                        help="utility data of the set difference (default %(default)s)")
    parser.add_argument("--nsamples", type=int, default=defaults.nsamples,
                        help="samples of the weight scores and prompts of the contrast (default %(default)s)")
    parser.add_argument("--fractions", default=",".join(f"{k:g}" for k in DEFAULT_FRACTIONS),
                        help="k: fractions of each layer's MLP neurons patched (default %(default)s)")
    parser.add_argument("--rankings", default=",".join(RANKINGS),
                        help=f"rankings compared, some of {','.join(RANKINGS)} (default %(default)s)")
    parser.add_argument("--random-seeds", default=",".join(map(str, defaults.random_seeds)),
                        help="seeds of the random neurons, the control (default %(default)s)")
    parser.add_argument("--setdiff-method", default=defaults.setdiff_method, choices=WEIGHT_METHODS,
                        help="the set difference's score (default %(default)s)")
    parser.add_argument("--setdiff-p", type=float, default=defaults.setdiff_p,
                        help="the set difference: each layer's top-p utility neurons go last (default %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                        help="greedy new tokens per prompt (default %(default)s)")
    parser.add_argument("--eval-batch-size", "--batch-size", dest="batch_size", type=int, default=defaults.batch_size,
                        help="prompts per generation batch (default %(default)s)")
    parser.add_argument("--score-batch-size", type=int, default=defaults.score_batch_size,
                        help="scoring samples per pass (default %(default)s)")
    parser.add_argument("--max-length", type=int, default=defaults.max_length,
                        help="tokens per scoring sample (default %(default)s)")
    add_eos_argument(parser)


def config_from_args(args: argparse.Namespace) -> NeuronStudyConfig:
    return NeuronStudyConfig(
        prompts=args.prompts, limit=args.limit, safety_data=args.safety_data, utility_data=args.utility_data,
        nsamples=args.nsamples, setdiff_method=args.setdiff_method, setdiff_p=args.setdiff_p,
        fractions=comma_floats(args.fractions, "--fractions"),
        rankings=tuple(name.strip() for name in args.rankings.split(",") if name.strip()),
        random_seeds=tuple(int(seed) for seed in comma_floats(args.random_seeds, "--random-seeds")),
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, score_batch_size=args.score_batch_size,
        max_length=args.max_length, seed=args.seed, data_dir=args.data_dir, add_eos=args.add_eos)


def run(args: argparse.Namespace) -> int:
    run_neuron_study(ModelSource(args.model, args.dtype, None, args.cache_dir),
                     ModelSource(args.base_model, args.dtype, None, args.cache_dir), config_from_args(args), args.out)
    return 0
