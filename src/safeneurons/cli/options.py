"""Options shared by the subcommands."""
from __future__ import annotations

import argparse


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


def add_model_arguments(parser: argparse.ArgumentParser, model_flag: str | tuple[str, ...] = "--model",
                        default: str | None = None,
                        dtypes: str = "float32, bfloat16 or float16", deepspeed: bool = True) -> None:
    """Options of subcommands that run a model (the model is required unless a default is given); `deepspeed`
    False where the stage holds the whole model on every rank; `model_flag` may name aliases after the flag."""
    flags = (model_flag,) if isinstance(model_flag, str) else model_flag
    parser.add_argument(*flags, required=default is None, default=default,
                        help="local HF folder, HF id, alias (llama2-7b-chat-hf, …) or `demo`")
    parser.add_argument("--dtype", default="float32", help=f"{dtypes} (default %(default)s)")
    if deepspeed:
        parser.add_argument("--deepspeed", metavar="CONFIG", default=None,
                            help="DeepSpeed JSON config: the model is partitioned across the ranks with ZeRO-3 "
                                 "(default: none, every rank holds the whole model)")
    parser.add_argument("--cache-dir", default=None, help="HF cache folder for model downloads")
    parser.add_argument("--data-dir", default=None,
                        help="folder with the named data sets' files (default $SAFENEURONS_DATA or ./data)")
    add_data_column_arguments(parser)


def add_shard_argument(parser: argparse.ArgumentParser) -> None:
    from safeneurons.models.loading import SHARD_MODES

    parser.add_argument("--shard", default="none", choices=SHARD_MODES,
                        help="layers: each rank holds one contiguous block of decoder layers, read from the "
                             "safetensors directly and balanced by parameters, the hidden states passed rank to rank "
                             "(for models that do not fit one rank; not with --deepspeed) (default %(default)s)")
    parser.add_argument("--stages", type=int, default=None,
                        help="with --shard layers: ranks per pipeline (default: the ranks of a node); the world is "
                             "stages × replicas, each replica running its share of the samples or prompts")


def add_data_column_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt-column", default=None, metavar="COLUMN",
                        help="the prompt column of the hub, datasets-folder and parquet/arrow data sets given here "
                             "that do not name one (SOURCE#prompt=COLUMN); default: the standard names (prompt, "
                             "instruction, messages) or a known benchmark's")
    parser.add_argument("--response-column", default=None, metavar="COLUMN",
                        help="the response column of those data sets (SOURCE#response=COLUMN)")


# The options that name a data set, across the commands
DATA_OPTIONS = ("data", "utility_data", "safety_data", "eval_prompts", "prune_data", "training_data", "harmful_data",
                "harmless_data", "perplexity_data", "harmful_training_data", "harmful", "harmless", "prompts")


def apply_data_columns(args: argparse.Namespace) -> None:
    """--prompt-column/--response-column written into each `datasets` source of the command line."""
    prompt, response = getattr(args, "prompt_column", None), getattr(args, "response_column", None)
    if not (prompt or response):
        return
    from safeneurons.data.hub import split_source_list, with_columns

    for name in DATA_OPTIONS:
        value = getattr(args, name, None)
        if isinstance(value, str):  # trace --data takes a comma-separated list
            setattr(args, name, ",".join(with_columns(source, prompt, response) for source in split_source_list(value)))


def add_tracking_arguments(parser: argparse.ArgumentParser, logging_dir: str) -> None:
    """--report-to and its folder (rank 0 logs loss, learning rate, gradient norm, throughput, the refusal curve)."""
    from safeneurons.runtime.tracking import REPORT_TO

    parser.add_argument("--report-to", default="none", choices=REPORT_TO,
                        help="experiment tracking: TensorBoard event files or a Weights & Biases run (WANDB_MODE="
                             "offline keeps it on disk), with the run's config (default %(default)s)")
    parser.add_argument("--logging-dir", default=None, help=f"the tracking folder (default {logging_dir})")


def add_neuron_arguments(group: argparse._ActionsContainer) -> None:
    """--neurons and --neuron-rule: the MLP neurons a command patches."""
    from safeneurons.masks.neurons import MASK_RULE_HELP, MASK_RULES

    group.add_argument("--neurons", nargs="+", default=[], metavar="LAYER:INDEXES",
                       help="the MLP neurons patched together in each layer: LAYER:INDEXES items (3:0,5,10-19) or "
                            "one mask file of `safeneurons score`")
    group.add_argument("--neuron-rule", default="rows", choices=MASK_RULES, help=f"{MASK_RULE_HELP} "
                       f"(default %(default)s)")


def comma_floats(text: str, option: str) -> tuple[float, ...]:
    """`0.01,0.05`: the numbers of a comma list; a bad one is an error naming `option`."""
    from safeneurons.errors import SafeneuronsError

    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise SafeneuronsError(f"{option} {text!r}: expected numbers separated by commas") from None
