"""`safeneurons finetune`: fine-tune with the safety-critical weights frozen (DeepSpeed ZeRO-3)."""
from __future__ import annotations

import argparse
from typing import Callable

from safeneurons.errors import SafeneuronsError
from safeneurons.finetune.api import fine_tune
from safeneurons.finetune.config import ENGINES, LR_SCHEDULERS, RESCORE_MODES, RUN_KEYS, FineTuneConfig
from safeneurons.finetune.constrained import PAPER_BETAS
from safeneurons.finetune.lisa import PAPER_STEPS
from safeneurons.runtime import distributed


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from safeneurons.cli.options import add_eos_argument, add_model_arguments, add_run_arguments

    add_model_arguments(parser, "--model", dtypes="float32 or bfloat16 (fp16 loss scaling would skip steps)")
    add_run_arguments(parser, out_required=False)
    parser.add_argument("--masks", default=None,
                        help="mask file or folder (masks.safetensors); without it, plain fine-tuning")
    parser.add_argument("--data", required=True, help="training data: a data set name or a file")
    parser.add_argument("--save-path", default=None, help="folder for the fine-tuned HF model (or --out)")
    defaults = FineTuneConfig(data="")
    for option, kind, meaning in (("--num-epochs", int, "passes over the data"),
                                  ("--learning-rate", float, "AdamW learning rate"),
                                  ("--batch-size", int, "samples per rank per micro-batch"),
                                  ("--max-length", int, "tokens per sample"),
                                  ("--weight-decay", float, "AdamW weight decay"),
                                  ("--gradient-accumulation-steps", int, "micro-batches per optimizer step"),
                                  ("--max-grad-norm", float, "gradient clipping norm, 0 = none")):
        dest = option[2:].replace("-", "_")
        parser.add_argument(option, type=kind, default=getattr(defaults, dest), help=meaning + " (default %(default)s)")
    parser.add_argument("--nsamples", type=int, default=None, help="train on this many samples (default all)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    parser.add_argument("--checkpoint-dir", default=None, help="folder for resumable checkpoints")
    parser.add_argument("--save-every", type=int, default=None, help="checkpoint every N optimizer steps")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in --checkpoint-dir (refused if the run's "
                             "settings or world size differ from the checkpoint's)")
    parser.add_argument("--resume-override", nargs="+", default=[], metavar="KEY",
                        help=f"run settings a --resume may change (of: {', '.join(RUN_KEYS)})")
    parser.add_argument("--keep-checkpoints", type=int, default=2,
                        help="keep the newest N checkpoints, delete older ones (default %(default)s)")
    add_eos_argument(parser)
    parser.add_argument("--engine", default="loop", help=f"{' or '.join(ENGINES)}: the built-in loop (default), or "
                        f"the same job through transformers.Trainer")
    add_training_extensions(parser, defaults)
    from safeneurons.cli.options import add_tracking_arguments

    add_tracking_arguments(parser, "SAVE_PATH/runs")
    parser.add_argument("--run-name", default=None, help="the tracked run's name (default: the save folder's name)")


def add_training_extensions(parser: argparse.ArgumentParser, defaults: FineTuneConfig) -> None:
    """Schedules, activation checkpointing, partial and dynamic freezing, the safety loss and LoRA."""
    group = parser.add_argument_group("schedule, memory and the seed's extensions")
    group.add_argument("--lr-scheduler", default=defaults.lr_scheduler,
                       help=f"learning-rate schedule over the planned steps: {', '.join(LR_SCHEDULERS)} "
                            f"(transformers'; default %(default)s)")
    group.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default 0)")
    group.add_argument("--warmup-ratio", type=float, default=0.0,
                       help="warm-up as a fraction of the planned steps, rounded up (default 0)")
    group.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute each decoder layer's activations in the backward (less memory, more time)")
    group.add_argument("--freeze-strength", type=float, default=1.0,
                       help="s in [0, 1]: after each step a masked element becomes lerp(after, before, s); 1 = "
                            "bit-exact freeze (default), 0 = plain training")
    group.add_argument("--rescore-every", type=int, default=None, metavar="K",
                       help="dynamic freezing: re-score every K optimizer steps (method and data of the mask's "
                            "score_summary.json) and update the frozen set")
    group.add_argument("--rescore-mode", default=defaults.rescore_mode,
                       help=f"{' or '.join(RESCORE_MODES)}: add the new selection to the frozen set, or replace it "
                            f"(default %(default)s)")
    group.add_argument("--safety-data", default=None,
                       help="refusal data (a data set name or a file): each step adds --safety-weight × its loss")
    group.add_argument("--safety-weight", type=float, default=defaults.safety_weight,
                       help="λ of the safety loss (default %(default)s)")
    group.add_argument("--constrained-betas", default=None, metavar="paper|B1,B2,B3",
                       help="token-wise constrained fine-tuning (Qi et al. 2024): each response token's log-prob "
                            "is held near the model's before training, with β for the first token, tokens 2–5 and "
                            "the rest; 'paper' = 0.5,2,0.1 (default: off, plain cross-entropy)")
    group.add_argument("--lisa-steps", default=None, metavar="paper|A,F",
                       help="Lisa (Huang et al. 2024): A steps on --safety-data, then F on --data, repeated, each with "
                            "a proximal term towards the weights at the last switch; 'paper' = 100,900 (default: off)")
    group.add_argument("--lisa-rho", type=float, default=defaults.lisa_rho,
                       help="Lisa's proximal weight ρ (default %(default)s; 0: alternation only)")
    group.add_argument("--eval-every", type=int, default=None, metavar="K",
                       help="refusal curve: the keyword refusal rate on --curve-prompts before training, every K "
                            "optimizer steps and at the end (greedy; freeze_report.json's refusal_curve)")
    group.add_argument("--curve-prompts", dest="eval_prompts", default=defaults.eval_prompts,
                       help="held-out harmful prompts of the curve (default %(default)s)")
    group.add_argument("--curve-limit", dest="eval_limit", type=int, default=defaults.eval_limit,
                       help="the first N of them (default %(default)s)")
    group.add_argument("--curve-max-new-tokens", dest="eval_max_new_tokens", type=int,
                       default=defaults.eval_max_new_tokens,
                       help="new tokens per generation of the curve (default %(default)s)")
    group.add_argument("--lora-r", type=int, default=0, help="LoRA rank through PEFT; 0 = full fine-tuning (default)")
    group.add_argument("--lora-alpha", type=float, default=defaults.lora_alpha, help="LoRA alpha (default %(default)s)")
    group.add_argument("--lora-targets", default=",".join(defaults.lora_targets),
                       help="comma-separated module names LoRA adapts (default %(default)s); with --masks the "
                            "adapter's contribution at masked elements is held at zero")


EXTENSION_KEYS = ("lr_scheduler", "warmup_steps", "warmup_ratio", "gradient_checkpointing", "freeze_strength",
                  "rescore_every", "rescore_mode", "safety_data", "safety_weight", "lora_r", "lora_alpha",
                  "eval_every", "eval_prompts", "eval_limit", "eval_max_new_tokens", "lisa_rho")


def paper_or_numbers(text: str | None, option: str, paper: tuple, kind: type, valid: Callable[[tuple], bool],
                     expected: str) -> tuple | None:
    """None (not given), the paper's values for `paper`, or as many comma-separated numbers as the paper has."""
    if text is None or text == "paper":
        return None if text is None else paper
    try:
        values = tuple(kind(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != len(paper) or not valid(values):
        raise SafeneuronsError(f"{option} {text!r}: expected 'paper' or {expected}")
    return values


def config_from_args(args: argparse.Namespace) -> FineTuneConfig:
    save_path = args.save_path or args.out
    if not save_path:
        raise SafeneuronsError("--save-path (or --out) is required: the folder for the fine-tuned model")
    extensions = {key: getattr(args, key) for key in EXTENSION_KEYS}
    extensions["lora_targets"] = tuple(name.strip() for name in args.lora_targets.split(",") if name.strip())
    extensions["constrained_betas"] = paper_or_numbers(
        args.constrained_betas, "--constrained-betas", PAPER_BETAS, float, lambda betas: all(b > 0 for b in betas),
        "three positive numbers B1,B2,B3 (first response token, tokens 2–5, the rest)")
    extensions["lisa_steps"] = paper_or_numbers(
        args.lisa_steps, "--lisa-steps", PAPER_STEPS, int, lambda steps: steps[0] >= 0 and steps[1] >= 1,
        "A,F with A >= 0 alignment and F >= 1 fine-tuning steps per cycle")
    return FineTuneConfig(
        data=args.data, save_path=save_path, num_epochs=args.num_epochs, learning_rate=args.learning_rate,
        batch_size=args.batch_size, max_length=args.max_length, weight_decay=args.weight_decay,
        gradient_accumulation_steps=args.gradient_accumulation_steps, max_grad_norm=args.max_grad_norm,
        seed=args.seed, dtype=args.dtype, deepspeed=args.deepspeed, checkpoint_dir=args.checkpoint_dir,
        save_every=args.save_every, resume=args.resume, data_dir=args.data_dir, nsamples=args.nsamples,
        max_steps=args.max_steps, cache_dir=args.cache_dir, add_eos=args.add_eos,
        keep_checkpoints=args.keep_checkpoints, resume_override=tuple(args.resume_override),
        engine=args.engine, report_to=args.report_to, logging_dir=args.logging_dir, run_name=args.run_name,
        **extensions)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    report = fine_tune(args.model, args.masks, config)
    if distributed.is_main():
        print(f"fine-tuned {report.steps} steps; frozen {report.frozen_count} elements, max |change| frozen "
              f"{report.max_abs_change_frozen:g}, free {report.max_abs_change_free:g}; model in {config.save_path}")
    return 0
