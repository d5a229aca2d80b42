"""`safeneurons circuit`: the refusal circuit as a graph of edges, scored by EAP and EAP-IG, checked by exact edge
patching and judged by faithfulness against random circuits."""
from __future__ import annotations

import argparse

from safeneurons.errors import SafeneuronsError
from safeneurons.evaluation.metrics import SUBSTRING_JUDGES
from safeneurons.interp.circuits.faithfulness import FRACTIONS
from safeneurons.interp.circuits.pairs import ALIGNMENTS
from safeneurons.interp.circuits.run import EXACT, RANKINGS, SELECTIONS, CircuitConfig, run_circuit
from safeneurons.interp.patching.sites import METRICS
from safeneurons.models.loading import ModelSource


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from safeneurons.cli.options import add_model_arguments, add_run_arguments, add_shard_argument

    add_model_arguments(parser, "--model")
    add_shard_argument(parser)
    add_run_arguments(parser, seeded=False)
    defaults = CircuitConfig()
    pairs = parser.add_argument_group("prompt pairs (clean = harmful, corrupted = harmless, paired in order)")
    pairs.add_argument("--harmful-data", "--harmful", dest="harmful", default=defaults.harmful,
                       help="clean prompts (default %(default)s)")
    pairs.add_argument("--harmless-data", "--harmless", dest="harmless", default=defaults.harmless,
                       help="corrupted prompts (default %(default)s)")
    pairs.add_argument("--n-pairs", type=int, default=defaults.n_pairs, help="default %(default)s")
    pairs.add_argument("--alignment", default=defaults.alignment, choices=ALIGNMENTS,
                       help="template: the tokens both prompts share at the start and the end (the chat template's "
                            "post-instruction tokens, the final position) align one to one, the instructions as one "
                            "position group; equal: prompts of the same length, position by position "
                            "(default %(default)s)")
    scoring = parser.add_argument_group("scores and circuits")
    scoring.add_argument("--metric", default=defaults.metric, choices=METRICS, help="default %(default)s")
    scoring.add_argument("--tokens", nargs=2, default=None, metavar=("A", "B"),
                         help="logit_diff: logit(A) − logit(B) of two one-token texts")
    scoring.add_argument("--direction", default=None, metavar="FILE", help="direction metric: a refusal direction")
    scoring.add_argument("--ig-steps", type=int, default=defaults.ig_steps,
                         help="EAP-IG's interpolation steps (1 is EAP) (default %(default)s)")
    scoring.add_argument("--ranking", default=defaults.ranking, choices=RANKINGS,
                         help="the scores the circuit is chosen by (default %(default)s)")
    scoring.add_argument("--selection", default=defaults.selection, choices=SELECTIONS,
                         help="top: the n edges of highest |score|; greedy: grown from the logits (default "
                              "%(default)s)")
    scoring.add_argument("--exact", default=defaults.exact, choices=EXACT,
                         help="edges patched exactly: none, the ranking's --top-k, or all (small models) "
                              "(default %(default)s)")
    scoring.add_argument("--top-k", type=int, default=defaults.top_k, help="default %(default)s")
    scoring.add_argument("--fractions", default=",".join(f"{fraction:g}" for fraction in FRACTIONS),
                         help="circuit sizes as fractions of the edges (default %(default)s)")
    scoring.add_argument("--random-seeds", type=int, default=defaults.random_seeds,
                         help="random circuits of each size, the control band (default %(default)s)")
    scoring.add_argument("--circuit-size", type=int, default=None,
                         help="edges of the circuit written and drawn (default: the smallest keeping 80%% of the "
                              "metric)")
    scoring.add_argument("--masks", default=None,
                         help="a mask from `score`: its share of safety-critical weights in the circuit's nodes")
    scoring.add_argument("--batch-size", type=int, default=defaults.batch_size,
                         help="circuits or edges patched per forward pass, prompts per generation batch (default "
                              "%(default)s)")
    _add_removal_arguments(parser, defaults)


def _add_removal_arguments(parser: argparse.ArgumentParser, defaults: CircuitConfig) -> None:
    removal = parser.add_argument_group("the circuit removed while the model answers")
    removal.add_argument("--removal-prompts", type=int, default=defaults.removal_prompts,
                         help="held-out harmful prompts (after the pairs') answered with the circuit's nodes "
                              "mean-ablated, against random nodes; 0: none (default %(default)s)")
    removal.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="default %(default)s")
    removal.add_argument("--judge", default=defaults.judge, choices=list(SUBSTRING_JUDGES),
                         help="substring judge of refusal (default %(default)s)")


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise SafeneuronsError(f"--fractions {text!r}: expected comma-separated fractions in (0, 1]") from None


def config_from_args(args: argparse.Namespace) -> CircuitConfig:
    return CircuitConfig(harmful=args.harmful, harmless=args.harmless, n_pairs=args.n_pairs, data_dir=args.data_dir,
                         alignment=args.alignment, ig_steps=args.ig_steps, metric=args.metric,
                         tokens=tuple(args.tokens) if args.tokens else None, direction=args.direction,
                         ranking=args.ranking, selection=args.selection, exact=args.exact, top_k=args.top_k,
                         fractions=_fractions(args.fractions), random_seeds=args.random_seeds,
                         circuit_size=args.circuit_size, masks=args.masks, batch_size=args.batch_size,
                         removal_prompts=args.removal_prompts, max_new_tokens=args.max_new_tokens, judge=args.judge)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    run_circuit(ModelSource(args.model, args.dtype, args.deepspeed, args.cache_dir, args.shard, args.stages), config,
                args.out)
    return 0
