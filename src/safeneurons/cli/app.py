"""`safeneurons`: one console script, one subcommand per stage.

Each command is a module of `safeneurons.cli` with `configure_parser(parser)` and `run(args) -> int | None`: the
arguments become a config, the config one library call. A command's module is imported only when it runs, so `safeneurons --help` stays fast. Also runnable as `python -m safeneurons.cli SUBCOMMAND …`
(for `torchrun -m` and `deepspeed --module`). Options may be spelled with `-` or `_` (`--sparsity-ratio` and the
original work's `--sparsity_ratio` are the same option).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any, Sequence

from safeneurons.errors import SafeneuronsError

STAGES: dict[str, tuple[str, str]] = {
    "score": ("safeneurons.cli.score", "find safety-critical weights or neurons (wanda, wandg, random)"),
    "finetune": ("safeneurons.cli.finetune", "fine-tune with the safety-critical weights frozen (DeepSpeed ZeRO-3)"),
    "compare": ("safeneurons.cli.compare", "compare masks and weights before and after fine-tuning"),
    "pipeline": ("safeneurons.cli.pipeline", "the whole study: score, fine-tune, re-score, compare, evaluate"),
    "patch": ("safeneurons.cli.patch", "activation patching of refusal circuits"),
    "circuit": ("safeneurons.cli.circuit", "refusal circuits as edges: EAP and EAP-IG scores, exact edge patching, "
                                           "faithfulness against random circuits"),
    "direction": ("safeneurons.cli.direction", "the refusal direction: candidates, selection, ablation, addition, "
                                               "orthogonalization"),
    "neurons": ("safeneurons.cli.neurons", "safety neurons: each ranking's top MLP neurons patched between an aligned "
                                           "model and its base during generation, against random neurons"),
    "safety-layers": ("safeneurons.cli.safety_layers", "SPPFT's safety layers from the cosine gap of harmful and "
                                                       "harmless queries, as whole-layer masks for finetune"),
    "trace": ("safeneurons.cli.trace", "model lineage by activation matching of MLP neurons"),
    "eval": ("safeneurons.cli.eval", "attack success rate, refusal rate and perplexity"),
    "prune": ("safeneurons.cli.prune", "zero the masked weights and save the model (remove safety-critical weights)"),
    "rewind": ("safeneurons.cli.rewind", "set the masked weights of a fine-tuned model back to the original's"),
    "defend": ("safeneurons.cli.defend", "a published defence after fine-tuning: RESTA, Safe LoRA or Antidote"),
    "lowrank": ("safeneurons.cli.lowrank", "remove safety-only ranks from every Linear (ActSVD)"),
    "ablate": ("safeneurons.cli.ablate", "prune top, set-difference and random masks over sparsities; evaluate each"),
    "plan": ("safeneurons.cli.plan", "memory per GPU of each stage for a model and cluster"),
    "demo-model": ("safeneurons.cli.demo_model", "write the built-in demo model and tokenizer as an HF folder"),
    "info": ("safeneurons.cli.info", "show how this launch is seen: launcher, ranks, backend, devices"),
}
LOCAL_RANK_OPTIONS = ("--local_rank", "--local-rank")


def normalize_option_spelling(argv: Sequence[str]) -> list[str]:
    """`--foo_bar[=v]` becomes `--foo-bar[=v]`; DeepSpeed's `--local_rank=N` is dropped (we read LOCAL_RANK)."""
    normalized: list[str] = []
    skip_next = False
    for index, token in enumerate(argv):
        if skip_next:
            skip_next = False
            continue
        name, sep, value = token.partition("=")
        if name in LOCAL_RANK_OPTIONS:
            skip_next = not sep and index + 1 < len(argv) and argv[index + 1].isdigit()
            continue
        if token.startswith("--"):
            token = name.replace("_", "-") + sep + value
        normalized.append(token)
    return normalized


DESCRIPTION = ("safeneurons: find the weights and neurons that carry an LLM's safety alignment, show that they "
               "matter, fine-tune with them frozen, evaluate, and locate refusal in the model (patching, the refusal "
               "direction, lineage), on one CPU or a GPU cluster with the same commands. One subcommand per stage; "
               "`safeneurons COMMAND --help` for its options.")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, like every other error of the tool (no usage dump), and whose help
    lists every option's choices."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        choices, text = kwargs.get("choices"), kwargs.get("help")
        if choices is not None and text and text is not argparse.SUPPRESS and "%(choices)s" not in text:
            kwargs["help"] = f"{text} (choices: {', '.join(map(str, choices))})"
        return super().add_argument(*args, **kwargs)


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    from safeneurons import __version__
    from safeneurons.cli.config_files import add_config_argument

    parser = OneLineParser(prog="safeneurons", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"safeneurons {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, summary) in STAGES.items():
        sub = commands.add_parser(name, help=summary, description=summary)
        if name == selected:
            module = _stage_module(module_name)
            if module is None or not hasattr(module, "configure_parser"):
                sub.description = f"{summary} (not available yet in this version)"
            else:
                module.configure_parser(sub)
                add_config_argument(sub)
    return parser


def command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    return parser._subparsers._group_actions[0].choices[command]


def _stage_module(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            return None
        raise


def quiet_libraries(uses_torch: bool = True) -> None:
    """Keep library noise out of the user's log: on a machine without CUDA, name DeepSpeed's accelerator so that
    it does not warn "Setting accelerator to CPU" on every command (on stdout, which `plan --json` needs clean);
    a warning that a library repeats at every step is shown once. A command of arithmetic only (`uses_torch`
    False) does not import torch for the first."""
    import os
    import warnings

    if uses_torch and "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    if getattr(warnings.showwarning, "shows_once", False):
        return
    shown: set[tuple[type, str]] = set()
    show = warnings.showwarning

    def show_once(message, category, *args, **kwargs):  # libraries may force "always": dedupe at display
        key = (category, str(message))
        if key not in shown:
            shown.add(key)
            show(message, category, *args, **kwargs)

    show_once.shows_once = True
    warnings.showwarning = show_once


def _selected_command(argv: Sequence[str]) -> str | None:
    return next((token for token in argv if not token.startswith("-")), None)


def parse_command_line(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The parser (with the selected command's options, and the defaults of its --config file) and the parsed
    arguments of a normalized command line; data sets named with --prompt-column/--response-column."""
    from safeneurons.cli.config_files import apply_config, config_file_of, read_config_file
    from safeneurons.cli.options import apply_data_columns

    selected = _selected_command(argv)
    parser = build_parser(selected if selected in STAGES else None)
    config_file = config_file_of(list(argv)) if selected in STAGES else None
    if config_file:
        apply_config(command_parser(parser, selected), read_config_file(config_file), config_file)
    args = parser.parse_args(argv)
    apply_data_columns(args)
    return parser, args


def write_run_config(parser: argparse.ArgumentParser, args: argparse.Namespace, module: Any) -> None:
    """Rank 0 records the options of a finished run as config.yaml in its results folder (when it has one)."""
    from safeneurons.cli.config_files import resolved_options, result_folder, write_resolved_config
    from safeneurons.runtime.launch import discover_launch

    distributed = sys.modules.get("safeneurons.runtime.distributed")  # its rank is torch's, once a group exists
    main_rank = distributed.is_main() if distributed is not None else discover_launch().rank == 0
    resolved = module.resolved_args(args) if hasattr(module, "resolved_args") else args
    folder = result_folder(resolved)
    if main_rank and folder is not None and folder.is_dir():
        write_resolved_config(folder, args.command, resolved_options(command_parser(parser, args.command), resolved))


def main(argv: Sequence[str] | None = None) -> int:
    argv = normalize_option_spelling(sys.argv[1:] if argv is None else argv)
    try:
        parser, args = parse_command_line(argv)
    except SafeneuronsError as error:
        print(f"safeneurons: error: {error}", file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help()
        return 2
    module = _stage_module(STAGES[args.command][0])
    if module is None or not hasattr(module, "run"):
        print(f"safeneurons: error: `{args.command}` is not available yet in this version", file=sys.stderr)
        return 2
    from safeneurons.runtime.launch import discover_launch, setup_logging

    launch = discover_launch()
    quiet_libraries(uses_torch=getattr(module, "USES_TORCH", True))
    setup_logging(launch.rank)
    finished = False
    try:
        code = int(module.run(args) or 0)
        if code == 0:
            write_run_config(parser, args, module)
        finished = True
        return code
    except SafeneuronsError as error:
        from safeneurons.cli.config_files import named_in_file, read_config_file

        prefix = f"[rank {launch.rank}] " if launch.world_size > 1 else ""
        message = named_in_file(str(error), read_config_file(args.config), args.config) if args.config else str(error)
        print(f"{prefix}safeneurons: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("safeneurons").warning("interrupted")
        return 130
    finally:
        distributed = sys.modules.get("safeneurons.runtime.distributed")  # loaded by every command that runs a model
        if distributed is not None:
            distributed.shutdown(synchronize=finished)


def check_command(argv: Sequence[str]) -> Any:
    """What a command line would run, checked without running it: the arguments parsed and turned into the
    command's config, validated (bad input raises SafeneuronsError); the parsed arguments for a command without
    a config. Nothing is loaded or written."""
    argv = normalize_option_spelling(argv)
    selected = _selected_command(argv)
    if selected not in STAGES:
        raise SafeneuronsError(f"{selected!r} is not a command; expected one of {', '.join(STAGES)}")
    _, args = parse_command_line(argv)
    module = _stage_module(STAGES[selected][0])
    if not hasattr(module, "config_from_args"):
        return args
    config = module.config_from_args(args)
    if hasattr(config, "validate"):
        config.validate()
    return config


def run_as_script() -> None:
    """The console script and `python -m safeneurons.cli`. A rank of a multi-process job leaves with os._exit once
    its work is done and the process group is gone: interpreter teardown of the communication libraries' threads
    occasionally aborted a finished rank ("terminate called without an active exception"), failing the job."""
    import os

    code = main()
    distributed = sys.modules.get("safeneurons.runtime.distributed")  # a command that ran imported it; --help not
    if distributed is not None and distributed.discover_launch().world_size > 1:
        mpi = sys.modules.get("mpi4py.MPI")
        if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
            mpi.Finalize()  # mpirun expects it; os._exit skips mpi4py's own atexit call
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
