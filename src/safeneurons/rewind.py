"""`safeneurons rewind`: a fine-tuned model with its masked elements set back to the original model's values
(Wei et al. 2024's check that the found weights carry the safety that fine-tuning removed).

Works on the safetensors files directly, one shard of the fine-tuned model at a time and one tensor of the
original at a time, so neither model is ever whole in memory; the other files of the fine-tuned folder (config,
tokenizer, index) are copied as they are.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoints import CheckpointFiles, local_model_folder, rewrite_checkpoint
from .errors import SafeneuronsError
from .masks import MaskReader, check_masks_fit

log = logging.getLogger(__name__)
SUMMARY_FILE = "rewind_summary.json"


@dataclass
class RewindPlan:
    original: CheckpointFiles
    finetuned: CheckpointFiles
    masks: MaskReader


def plan_rewind(original: str, finetuned: str, masks: str, cache_dir: str | None = None) -> RewindPlan:
    """Check, from file headers only, that both models have the same tensors (names, shapes, dtypes) and that
    every mask fits one of them; the error names the first misfit."""
    plan = RewindPlan(CheckpointFiles(local_model_folder(original, cache_dir)),
                      CheckpointFiles(local_model_folder(finetuned, cache_dir)), MaskReader(masks))
    before, after = plan.original.metadata(), plan.finetuned.metadata()
    for name, (shape, dtype) in after.items():
        if name not in before:
            raise SafeneuronsError(f"--finetuned has tensor {name!r}, which --original does not: not the same "
                                   f"architecture")
        if before[name] != (shape, dtype):
            raise SafeneuronsError(f"tensor {name!r} is {shape} {dtype} in --finetuned but {before[name][0]} "
                                   f"{before[name][1]} in --original")
    missing = sorted(set(before) - set(after))
    if missing:
        raise SafeneuronsError(f"--original has tensor {missing[0]!r}, which --finetuned does not")
    check_masks_fit(plan.masks.shapes(), {name: shape for name, (shape, _) in after.items()})
    return plan


def rewind_files(plan: RewindPlan, out: Path) -> dict[str, Any]:
    """Write the rewound weights (and copies of the fine-tuned folder's other files) into `out`."""
    per_tensor: dict[str, int] = {}
    masked = set(plan.masks.names)

    def rewind(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name not in masked:
            return tensor
        mask = plan.masks.get(name)
        per_tensor[name] = int(mask.sum())
        return torch.where(mask, plan.original.get(name), tensor)

    rewrite_checkpoint(plan.finetuned, out, rewind)
    return {"rewound": sum(per_tensor.values()), "per_tensor": per_tensor}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from .cli import add_run_arguments

    add_run_arguments(parser, seeded=False)
    parser.add_argument("--original", required=True, help="the model before fine-tuning (folder, HF id or demo)")
    parser.add_argument("--finetuned", required=True, help="the fine-tuned model (folder or HF id)")
    parser.add_argument("--masks", required=True, help="mask file or folder: the elements to set back")
    parser.add_argument("--cache-dir", default=None, help="HF cache folder for model ids")


def run(args: argparse.Namespace) -> int:
    from . import distributed
    from .outputs import check_output_dir, discard_staging, publish_dir, staging_dir, write_json

    check_output_dir(args.out)
    plan = plan_rewind(args.original, args.finetuned, args.masks, args.cache_dir)
    if not distributed.is_main():  # file work: one process does it
        return 0
    staging = staging_dir(args.out, fresh=True)
    try:
        summary = rewind_files(plan, staging)
        write_json(staging / SUMMARY_FILE, {**summary, "original": args.original, "finetuned": args.finetuned,
                                            "masks": str(args.masks)})
        publish_dir(args.out)
    except BaseException:
        discard_staging(args.out)
        raise
    print(f"rewound {summary['rewound']} elements of {len(summary['per_tensor'])} tensors to the original's "
          f"values -> {args.out}")
    return 0
