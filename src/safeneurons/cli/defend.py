"""`safeneurons defend`: a published defence applied to a fine-tuned model after fine-tuning — RESTA (the safety
vector added back), Safe LoRA (updates projected onto the alignment subspace) or Antidote (Wanda-pruning on harmful
data)."""
from __future__ import annotations

import argparse

from safeneurons.errors import SafeneuronsError
from safeneurons.interventions.antidote import AUTHORS_MODULES, DEFAULT_SPARSITY, AntidoteConfig, run_antidote
from safeneurons.interventions.safe_lora import (DEFAULT_LAYERS, DEFAULT_THRESHOLD, SELECTIONS, SafeLoraConfig,
                                                 run_safe_lora)
from safeneurons.interventions.task_arithmetic import RestaConfig, run_resta

METHODS = ("resta", "safe_lora", "antidote")
NEEDS = {"resta": ("aligned", "base_model"), "safe_lora": ("aligned", "base_model"),
         "antidote": ("harmful_training_data",)}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from safeneurons.cli.options import add_model_arguments, add_run_arguments

    parser.add_argument("--defence", "--method", dest="method", required=True, choices=METHODS,
                        help="the defence applied to the fine-tuned model")
    add_model_arguments(parser, ("--model", "--finetuned"))
    add_run_arguments(parser)
    parser.add_argument("--aligned", help="resta, safe_lora: the model that was fine-tuned (folder, HF id or demo)")
    parser.add_argument("--base-model", help="resta, safe_lora: the model before alignment (demo: demo-base); for "
                                             "resta also an aligned model made harmful")
    group = parser.add_argument_group("resta")
    group.add_argument("--resta-scale", type=float, default=1.0,
                       help="the safety vector's coefficient (default %(default)s; 0 changes nothing)")
    group.add_argument("--dare-drop", type=float, default=0.0,
                       help="DARE's drop probability on the fine-tuning delta first (default %(default)s: none)")
    group = parser.add_argument_group("safe_lora")
    group.add_argument("--safe-lora-selection", choices=SELECTIONS, default=SafeLoraConfig.selection,
                       help="project the N least similar layers and any tied with the N-th (number, the authors' "
                            "default), or every layer at or below the threshold (default %(default)s; choices "
                            "%(choices)s)")
    group.add_argument("--safe-lora-threshold", type=float, default=DEFAULT_THRESHOLD,
                       help="τ, with --safe-lora-selection threshold: project layers whose similarity to their "
                            "projection is at most τ (default %(default)s)")
    group.add_argument("--safe-lora-layers", type=int, default=DEFAULT_LAYERS,
                       help="N, with --safe-lora-selection number (default %(default)s; 0 projects none)")
    group = parser.add_argument_group("antidote")
    group.add_argument("--harmful-training-data", default=None,
                       help="the re-alignment data: harmful prompts with harmful answers (pipeline's name for them)")
    group.add_argument("--antidote-sparsity", type=float, default=DEFAULT_SPARSITY,
                       help="fraction of each row pruned (default %(default)s; 0 changes nothing)")
    group.add_argument("--antidote-modules", default=",".join(AUTHORS_MODULES), metavar="NAMES|all",
                       help="the Linears pruned, by module name: the authors' q,k,v of full fine-tuning, or 'all' "
                            "for every Linear (default %(default)s)")
    group.add_argument("--nsamples", type=int, default=128, help="harmful samples scored (default %(default)s)")
    group.add_argument("--max-length", type=int, default=512, help="tokens per sample (default %(default)s)")
    group.add_argument("--batch-size", type=int, default=1, help="samples per scoring pass (default %(default)s)")


def check_needs(args: argparse.Namespace) -> None:
    missing = [name for name in NEEDS[args.method] if getattr(args, name) is None]
    if missing:
        raise SafeneuronsError(f"--defence {args.method} needs --{missing[0].replace('_', '-')}")


def config_from_args(args: argparse.Namespace) -> RestaConfig | SafeLoraConfig | AntidoteConfig:
    check_needs(args)
    if args.method == "resta":
        config = RestaConfig(args.model, args.aligned, args.base_model, args.resta_scale, args.dare_drop,
                             args.seed, args.cache_dir)
    elif args.method == "safe_lora":
        config = SafeLoraConfig(args.model, args.aligned, args.base_model, args.safe_lora_selection,
                                args.safe_lora_threshold, args.safe_lora_layers, args.cache_dir)
    else:
        config = AntidoteConfig(args.model, args.harmful_training_data, args.antidote_sparsity, args.nsamples,
                                args.max_length, args.batch_size, args.seed, args.data_dir, args.dtype,
                                args.deepspeed, args.cache_dir, antidote_modules(args.antidote_modules))
    config.validate()
    return config


def antidote_modules(text: str) -> tuple[str, ...] | None:
    """`all` (every Linear) or a comma-separated list of module names."""
    return None if text.strip() == "all" else tuple(name.strip() for name in text.split(","))


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if isinstance(config, RestaConfig):
        resta = run_resta(config, args.out)
        if resta is not None:
            print(f"moved {resta.tensors} tensors by {config.scale} × the safety vector (norm "
                  f"{resta.safety_vector_norm:.4g}) -> {args.out}")
    elif isinstance(config, SafeLoraConfig):
        safe_lora = run_safe_lora(config, args.out)
        if safe_lora is not None:
            print(f"projected {len(safe_lora.projected)} of {len(safe_lora.similarities)} changed matrices "
                  f"-> {args.out}")
    else:
        antidote = run_antidote(config, args.out)
        if antidote is not None:
            print(f"pruned {antidote.pruned.pruned if antidote.pruned else 0} weights -> {args.out}")
    return 0
