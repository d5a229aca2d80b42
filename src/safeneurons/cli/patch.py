"""`safeneurons patch`: activation patching of refusal circuits."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from safeneurons.errors import SafeneuronsError
from safeneurons.interp.patching.run import EACH, DirectionConfig, PatchConfig, run_direction, run_patch
from safeneurons.interp.patching.sites import COMPONENTS, DEFAULT_SIGNIFICANCE, METHODS, METRICS, MODES, REFUSAL_STARTS
from safeneurons.models.loading import ModelSource

if TYPE_CHECKING:
    from safeneurons.interp.patching.sites import Position


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from safeneurons.cli.options import (add_model_arguments, add_neuron_arguments, add_run_arguments,
                                         add_shard_argument)

    add_model_arguments(parser, "--model")
    add_shard_argument(parser)  # --shard layers: each stage patches the sites of its own layers
    add_run_arguments(parser)
    prompts = parser.add_argument_group("prompts (chat-formatted unless already in chat format or --raw)")
    prompts.add_argument("--clean", "--base", default=None, metavar="TEXT",
                         help="clean prompt (the base run of interchange), e.g. a harmful request")
    prompts.add_argument("--clean-file", default=None, metavar="FILE", help="the clean prompt from a text file")
    prompts.add_argument("--corrupted", "--source", default=None, metavar="TEXT",
                         help="corrupted prompt (the source of interchange), e.g. a harmless request")
    prompts.add_argument("--corrupted-file", default=None, metavar="FILE", help="the corrupted prompt from a file")
    prompts.add_argument("--raw", action="store_true", help="tokenise the prompts as given, without the chat format")
    prompts.add_argument("--source-model", default=None, metavar="MODEL",
                         help="cross-model patching: the source run is this model's (same structure and tokenizer; "
                              "the corrupted prompt defaults to the clean one), e.g. demo-chat into --model demo-base")
    sweep = parser.add_argument_group("sites and metric")
    sweep.add_argument("--mode", default="noising", choices=MODES, help="default %(default)s")
    sweep.add_argument("--patch-method", "--method", dest="method", default="exact", choices=METHODS,
                       help="exact (batched patched runs) or attribution (first order, one forward + one backward) "
                            "(default %(default)s)")
    sweep.add_argument("--components", default="residual",
                       help=f"comma list of {','.join(COMPONENTS)} (default %(default)s)")
    add_neuron_arguments(sweep)
    sweep.add_argument("--layers", default="all", help="all, or a comma list of layer indexes (default %(default)s)")
    sweep.add_argument("--positions", default="last",
                       help="comma list of: last, all (every token at once), each (one site per token), a token "
                            "index (negative: from the end) (default %(default)s)")
    sweep.add_argument("--metric", default="refusal", choices=METRICS, help="default %(default)s")
    sweep.add_argument("--tokens", nargs=2, default=None, metavar=("A", "B"),
                       help="logit_diff: logit(A) − logit(B) of two one-token texts, e.g. ' I' ' Sure'")
    sweep.add_argument("--direction", default=None, metavar="FILE",
                       help="direction metric: refusal direction file (from --compute-direction)")
    sweep.add_argument("--refusal-starts", nargs="+", default=list(REFUSAL_STARTS), metavar="TEXT",
                       help="refusal metric: refusal openings whose first token counts (default: %(default)s)")
    sweep.add_argument("--batch-size", type=int, default=None,
                       help="patched runs per forward pass (default: as many as fit a memory bound)")
    sweep.add_argument("--top", type=int, default=15,
                       help="sites listed in the report; with --method attribution, also the number of its top "
                            "sites patched exactly beside their estimates (default %(default)s)")
    sweep.add_argument("--significance-threshold", type=float, default=DEFAULT_SIGNIFICANCE,
                       help="|effect| above which a site is significant (default %(default)s)")
    _add_direction_arguments(parser)


def _add_direction_arguments(parser: argparse.ArgumentParser) -> None:
    direction = parser.add_argument_group("refusal direction (--compute-direction)")
    direction.add_argument("--compute-direction", action="store_true",
                           help="write OUT/refusal_direction.pt: mean residual of harmful minus harmless prompts")
    direction.add_argument("--harmful-data", "--harmful", dest="harmful", default="demo-harmful",
                           help="harmful prompts (default %(default)s)")
    direction.add_argument("--harmless-data", "--harmless", dest="harmless", default="demo-harmless",
                           help="harmless prompts (default %(default)s)")
    direction.add_argument("--n-prompts", type=int, default=64, help="prompts of each set (default %(default)s)")
    direction.add_argument("--layer", type=int, default=None,
                           help="layer whose output is averaged (default: the last, i.e. the final residual)")


def _parse_components(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _parse_layers(text: str) -> list[int] | None:
    if text.strip() == "all":
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SafeneuronsError(f"--layers {text!r}: expected all or layer indexes separated by commas") from None


def _parse_positions(text: str) -> tuple[Position, ...]:
    error = SafeneuronsError(f"--positions {text!r}: expected a comma list of last, all, each or token indexes")
    positions: list[Position] = []
    for part in (part.strip() for part in text.split(",") if part.strip()):
        if part in ("last", "all", EACH):
            positions.append(part)
        elif part.lstrip("-").isdigit():
            positions.append(int(part))
        else:
            raise error
    if not positions:
        raise error
    return tuple(positions)


def _prompt_text(args: argparse.Namespace, name: str) -> str:
    """--NAME TEXT or --NAME-file FILE, exactly one of them."""
    given = [flag for flag in (name, f"{name}_file") if getattr(args, flag) is not None]
    if len(given) != 1:
        raise SafeneuronsError(f"give exactly one of --{name} TEXT and --{name}-file FILE")
    path = getattr(args, f"{name}_file")
    if path is None:
        return getattr(args, name)
    if not Path(path).is_file():
        raise SafeneuronsError(f"--{name}-file {path} does not exist")
    return Path(path).read_text().strip()


def config_from_args(args: argparse.Namespace) -> PatchConfig | DirectionConfig:
    if args.compute_direction:
        return DirectionConfig(args.harmful, args.harmless, args.n_prompts, args.layer, args.data_dir)
    layers = _parse_layers(args.layers)
    clean = _prompt_text(args, "clean")
    same_prompt = args.source_model is not None and args.corrupted is None and args.corrupted_file is None
    return PatchConfig(clean=clean, corrupted=clean if same_prompt else _prompt_text(args, "corrupted"), raw=args.raw,
                       mode=args.mode, method=args.method, components=_parse_components(args.components),
                       layers=None if layers is None else tuple(layers), positions=_parse_positions(args.positions),
                       metric=args.metric, tokens=tuple(args.tokens) if args.tokens else None,
                       direction=args.direction, refusal_starts=tuple(args.refusal_starts),
                       batch_size=args.batch_size, top=args.top, significance_threshold=args.significance_threshold,
                       neurons=tuple(args.neurons), neuron_rule=args.neuron_rule, source_model=args.source_model)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    model = ModelSource(args.model, args.dtype, args.deepspeed, args.cache_dir, args.shard, args.stages)
    if isinstance(config, DirectionConfig):
        run_direction(model, config, args.out)
    else:
        run_patch(model, config, args.out)
    return 0
