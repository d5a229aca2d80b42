"""`safeneurons pipeline`: the whole study: score, fine-tune, re-score, compare, evaluate."""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import fields
from pathlib import Path

from safeneurons.workflows.pipeline.report import print_summary
from safeneurons.workflows.pipeline.settings import DEMO_PROFILE, SETTING_HELP, PipelineConfig, resolve_config
from safeneurons.workflows.pipeline.run import run_pipeline

log = logging.getLogger(__name__)
# One name per concept across the commands (score --score-method, eval --eval-limit); the seed's flags stay aliases
FLAGS = {"results_path": ["--results-path", "--out"], "prune_method": ["--score-method", "--prune-method"]}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    defaults = PipelineConfig()
    for item in fields(PipelineConfig):
        if item.name not in SETTING_HELP:
            continue
        aliases = FLAGS.get(item.name, ["--" + item.name.replace("_", "-")])
        kind = {"sparsity_ratio": float, "learning_rate": float, "finetune_nsamples": int, "setdiff_q": float,
                "setdiff_p": float, "attack_halving_fraction": float}.get(item.name)
        if kind is None and isinstance(getattr(defaults, item.name), int):
            kind = int
        demo = DEMO_PROFILE.get(item.name, getattr(defaults, item.name))
        parser.add_argument(*aliases, dest=item.name, type=kind, default=None,
                            help=f"{SETTING_HELP[item.name]} (default {getattr(defaults, item.name)}; demo: {demo})")
    parser.add_argument("--no-random-control", dest="random_control", action="store_false", default=None,
                        help="skip the random-mask control arm")
    parser.add_argument("--add-eos", dest="add_eos", action="store_true", default=None,
                        help="append EOS to every response when scoring, fine-tuning and measuring perplexity "
                             "(default: none, as the original work)")
    parser.add_argument("--direction", dest="direction", action="store_true", default=None,
                        help="add the base model's refusal direction (candidates, selection, ablation, "
                             "orthogonalization, its link to the safety mask) as a stage and a report section")
    parser.add_argument("--circuit", dest="circuit", action="store_true", default=None,
                        help="add the aligned model's refusal circuit as edges (EAP, EAP-IG, exact edge patching, "
                             "faithfulness against random circuits, its nodes against the safety mask) as a stage "
                             "and a report section")
    parser.add_argument("--neuron-patching", dest="neuron_patching", action="store_true", default=None,
                        help="add the safety-neuron study (rankings' top k%% of MLP neurons patched between --model "
                             "and --neuron-base-model during generation, against random neurons) as a stage and a "
                             "report section")
    parser.add_argument("--force", action="store_true", help="redo every stage, even those already finished")
    from safeneurons.cli.options import add_data_column_arguments

    add_data_column_arguments(parser)


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """The options given on the command line over the defaults `resolve_config` chooses."""
    return resolve_config({item.name: getattr(args, item.name) for item in fields(PipelineConfig)
                           if getattr(args, item.name, None) is not None})


def resolved_args(args: argparse.Namespace) -> argparse.Namespace:
    """The options with the defaults the profile chose, as config.yaml records them (`model: demo` included, so
    the file runs the same study wherever it is run)."""
    settings = getattr(args, "settings", None) or config_from_args(args)
    return argparse.Namespace(**{**vars(args), **{item.name: getattr(settings, item.name)
                                                  for item in fields(PipelineConfig) if hasattr(args, item.name)}})


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    settings = args.settings = config_from_args(args)
    summary = run_pipeline(settings, args.force)
    if summary is not None:
        print_summary(summary, Path(settings.results_path), time.perf_counter() - started)
    return 0
