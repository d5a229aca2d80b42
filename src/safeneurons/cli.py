"""`safeneurons`: one console script, one subcommand per stage.

Each stage module provides `configure_parser(parser)` and `run(args) -> int | None`; it is imported only when its
subcommand runs, so `safeneurons --help` stays fast. Also runnable as `python -m safeneurons.cli SUBCOMMAND …`
(for `torchrun -m` and `deepspeed --module`). Options may be spelled with `-` or `_` (`--sparsity-ratio` and the
original work's `--sparsity_ratio` are the same option).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from .errors import SafeneuronsError

STAGES: dict[str, tuple[str, str]] = {
    "score": ("safeneurons.scoring", "find safety-critical weights or neurons (wanda, wandg, random)"),
    "finetune": ("safeneurons.finetune", "fine-tune with the safety-critical weights frozen (DeepSpeed ZeRO-3)"),
    "compare": ("safeneurons.compare", "compare masks and weights before and after fine-tuning"),
    "pipeline": ("safeneurons.pipeline", "the whole study: score, fine-tune, re-score, compare, evaluate"),
    "patch": ("safeneurons.patching", "activation patching of refusal circuits"),
    "trace": ("safeneurons.tracing", "model lineage by activation matching of MLP neurons"),
    "eval": ("safeneurons.evaluate", "attack success rate, refusal rate and perplexity"),
    "prune": ("safeneurons.prune", "zero the masked weights and save the model (remove safety-critical weights)"),
    "rewind": ("safeneurons.rewind", "set the masked weights of a fine-tuned model back to the original's"),
    "lowrank": ("safeneurons.lowrank", "remove safety-only ranks from every Linear (ActSVD)"),
    "ablate": ("safeneurons.ablation", "prune top, set-difference and random masks over sparsities; evaluate each"),
    "plan": ("safeneurons.plan", "memory per GPU of each stage for a model and cluster"),
    "demo-model": ("safeneurons.demo", "write the built-in demo model and tokenizer as an HF folder"),
    "info": ("safeneurons.distributed", "show how this launch is seen: launcher, ranks, backend, devices"),
}
LOCAL_RANK_OPTIONS = ("--local_rank", "--local-rank")


def add_run_arguments(parser: argparse.ArgumentParser, out_required: bool = True, seeded: bool = True) -> None:
    """Options every subcommand takes: --seed and --out (alias --results-path). A stage that draws nothing at
    random still accepts --seed (launch scripts pass it everywhere) and says that it has no effect."""
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed (default %(default)s)" if seeded else
                             "accepted for uniform launch scripts; no effect here, nothing is drawn at random "
                             "(default %(default)s)")
    parser.add_argument("--out", "--results-path", dest="out", required=out_required, metavar="DIR",
                        help="folder for the results")


def add_eos_argument(parser: argparse.ArgumentParser) -> None:
    """Samples are prompt + response without EOS, as the original work builds them; --add-eos appends it."""
    parser.add_argument("--add-eos", action="store_true",
                        help="append EOS to every response (default: none, as the original work)")


def add_model_arguments(parser: argparse.ArgumentParser, model_flag: str = "--model", default: str | None = None,
                        dtypes: str = "float32, bfloat16 or float16", deepspeed: bool = True) -> None:
    """Options of subcommands that run a model (the model is required unless a default is given); `deepspeed`
    False where the stage holds the whole model on every rank."""
    parser.add_argument(model_flag, required=default is None, default=default,
                        help="local HF folder, HF id, alias (llama2-7b-chat-hf, …) or `demo`")
    parser.add_argument("--dtype", default="float32", help=f"{dtypes} (default %(default)s)")
    if deepspeed:
        parser.add_argument("--deepspeed", metavar="CONFIG", default=None,
                            help="DeepSpeed JSON config: the model is partitioned across the ranks with ZeRO-3 "
                                 "(default: none, every rank holds the whole model)")
    parser.add_argument("--cache-dir", default=None, help="HF cache folder for model downloads")
    parser.add_argument("--data-dir", default=None,
                        help="folder with the named data sets' files (default $SAFENEURONS_DATA or ./data)")


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


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safeneurons", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, summary) in STAGES.items():
        sub = commands.add_parser(name, help=summary, description=summary)
        if name == selected:
            module = _stage_module(module_name)
            if module is None or not hasattr(module, "configure_parser"):
                sub.description = f"{summary} (not available yet in this version)"
            else:
                module.configure_parser(sub)
    return parser


def _stage_module(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            return None
        raise


def quiet_libraries() -> None:
    """Keep library noise out of the user's log: on a machine without CUDA, name DeepSpeed's accelerator so that
    it does not warn "Setting accelerator to CPU" on every command (on stdout, which `plan --json` needs clean);
    a warning that a library repeats at every step is shown once."""
    import os
    import warnings

    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = normalize_option_spelling(sys.argv[1:] if argv is None else argv)
    selected = next((token for token in argv if not token.startswith("-")), None)
    parser = build_parser(selected if selected in STAGES else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = _stage_module(STAGES[args.command][0])
    if module is None or not hasattr(module, "run"):
        print(f"safeneurons: error: `{args.command}` is not available yet in this version", file=sys.stderr)
        return 2
    from . import distributed

    quiet_libraries()
    distributed.setup_logging(distributed.discover_launch().rank)
    finished = False
    try:
        code = int(module.run(args) or 0)
        finished = True
        return code
    except SafeneuronsError as error:
        prefix = f"[rank {distributed.rank()}] " if distributed.world_size() > 1 else ""
        print(f"{prefix}safeneurons: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("safeneurons").warning("interrupted")
        return 130
    finally:
        distributed.shutdown(synchronize=finished)


def run_as_script() -> None:
    """The console script and `python -m safeneurons.cli`. A rank of a multi-process job leaves with os._exit once
    its work is done and the process group is gone: interpreter teardown of the communication libraries' threads
    occasionally aborted a finished rank ("terminate called without an active exception"), failing the job."""
    import os

    from . import distributed

    code = main()
    if distributed.discover_launch().world_size > 1:
        mpi = sys.modules.get("mpi4py.MPI")
        if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
            mpi.Finalize()  # mpirun expects it; os._exit skips mpi4py's own atexit call
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run_as_script()
