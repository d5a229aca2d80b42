"""`safeneurons plan`: memory per GPU of each stage for a model and cluster."""
from __future__ import annotations

import argparse
import json

USES_TORCH = False  # arithmetic only: `plan` starts without importing torch (cli.app)

from safeneurons.runtime.launch import discover_launch
from safeneurons.runtime.memory import parse_memory_size
from safeneurons.scores.sizes import ACCUMULATE_DTYPES
from safeneurons.workflows.plan import OFFLOAD_CHOICES, Cluster, PlanConfig, Workload, format_table, run_plan
from safeneurons.workflows.plan_model import PRESETS


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from safeneurons.cli.options import add_run_arguments

    add_run_arguments(parser, out_required=False, seeded=False)
    parser.add_argument("--model", required=True, help=f"{', '.join(PRESETS)} (or their -chat-hf aliases), "
                        "or a local folder with config.json")
    parser.add_argument("--nodes", type=int, default=1, help="(default %(default)s)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="(default %(default)s)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default %(default)s)")
    parser.add_argument("--offload", nargs="?", const="optimizer", default="none", choices=OFFLOAD_CHOICES,
                        help="ZeRO-3 CPU offload: optimizer (the default of a bare --offload) or param "
                             "(optimizer and parameters)")
    parser.add_argument("--batch-size", type=int, default=Workload.batch_size,
                        help="fine-tuning sequences per GPU (default %(default)s); scoring runs one sample at a time")
    parser.add_argument("--max-length", type=int, default=Workload.max_length,
                        help="tokens per sequence (default %(default)s)")
    parser.add_argument("--sparsity-ratio", type=float, default=Workload.sparsity_ratio,
                        help="fraction of the scored weights frozen (default %(default)s)")
    parser.add_argument("--eval-batch-size", type=int, default=Workload.eval_batch_size,
                        help="eval: prompts per generation batch per GPU (default %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=Workload.max_new_tokens,
                        help="eval: new tokens per generation (default %(default)s)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="fine-tuning with activation checkpointing (finetune --gradient-checkpointing)")
    parser.add_argument("--score-batch-size", type=int, default=Workload.score_batch_size,
                        help="score: samples per pass (default %(default)s)")
    parser.add_argument("--score-memory", default="auto", metavar="SIZE",
                        help="score --score-memory: memory per GPU for wandg's sums (default auto: half of what is "
                             "left free)")
    parser.add_argument("--accumulate-dtype", default=Workload.accumulate_dtype, choices=ACCUMULATE_DTYPES,
                        help="score --accumulate-dtype: fixed sums take 8 bytes a weight, exact 16, float32 4, model 2 "
                             "(bf16) "
                             "(default %(default)s)")
    parser.add_argument("--patch-length", type=int, default=Workload.patch_length,
                        help="patch: tokens of the prompts (default %(default)s)")
    parser.add_argument("--patch-batch-size", type=int, default=None,
                        help="patch --batch-size: patched runs per forward pass (default auto, as patch)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (--out also writes DIR/plan.json)")


def config_from_args(args: argparse.Namespace) -> PlanConfig:
    return PlanConfig(args.model, Cluster(args.nodes, args.gpus_per_node, args.gpu_memory, args.offload),
                      Workload(args.batch_size, args.max_length, args.sparsity_ratio, args.gradient_checkpointing,
                               args.eval_batch_size, args.max_new_tokens, args.score_batch_size,
                               parse_memory_size(args.score_memory, "--score-memory"), args.patch_length,
                               args.patch_batch_size, args.accumulate_dtype))


def run(args: argparse.Namespace) -> int:
    report = run_plan(config_from_args(args), args.out)
    if discover_launch().rank == 0:
        print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0 if all(stage["fits"] for stage in report["stages"]) else 1
