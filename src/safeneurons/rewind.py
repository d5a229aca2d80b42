"""`safeneurons rewind`: a fine-tuned model with its masked elements set back to the original model's values
(Wei et al. 2024's check that the found weights carry the safety that fine-tuning removed).

Works on the safetensors files directly, one shard of the fine-tuned model at a time and one tensor of the
original at a time, so neither model is ever whole in memory; the other files of the fine-tuned folder (config,
tokenizer, index) are copied as they are.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import SafeneuronsError
from .masks import MaskReader, check_masks_fit

log = logging.getLogger(__name__)
SUMMARY_FILE = "rewind_summary.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = WEIGHTS_FILE + ".index.json"


class CheckpointFiles:
    """The safetensors weights of an HF folder (one file or shards with an index), read tensor by tensor."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = folder / INDEX_FILE
        if index.is_file():
            mapping = json.loads(index.read_text())["weight_map"]
            self.weight_map = {name: folder / shard for name, shard in mapping.items()}
        elif (folder / WEIGHTS_FILE).is_file():
            with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as handle:
                self.weight_map = {name: folder / WEIGHTS_FILE for name in handle.keys()}
        else:
            raise SafeneuronsError(f"{folder} has no {WEIGHTS_FILE} or {INDEX_FILE} (rewind reads safetensors "
                                   f"weights)")

    @property
    def shards(self) -> list[Path]:
        return sorted(set(self.weight_map.values()))

    def metadata(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Shape and dtype of every tensor, read from the file headers only."""
        found = {}
        for shard in self.shards:
            with safe_open(str(shard), framework="pt") as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    found[name] = (tuple(view.get_shape()), view.get_dtype())
        return found

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self.weight_map[name]), framework="pt") as handle:
            return handle.get_tensor(name)


def local_model_folder(name: str, cache_dir: str | None = None) -> Path:
    """The local folder holding a model's files: a folder, `demo`, or an HF id found in the local cache."""
    from .models import resolve_model_name

    resolved = resolve_model_name(name)
    if Path(resolved).is_dir():
        return Path(resolved)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(resolved, cache_dir=cache_dir, local_files_only=True))
    except Exception:  # huggingface_hub raises several types for "not in the cache"
        raise SafeneuronsError(f"model {name!r} is not available locally: rewind reads its safetensors files; "
                               f"download it (`huggingface-cli download {resolved} --local-dir DIR`) and pass "
                               f"DIR") from None


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
    masked = set(plan.masks.names)
    per_tensor: dict[str, int] = {}
    for shard in plan.finetuned.shards:
        tensors = {}
        with safe_open(str(shard), framework="pt") as handle:
            metadata = handle.metadata()
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                if name in masked:
                    mask = plan.masks.get(name)
                    tensor = torch.where(mask, plan.original.get(name), tensor)
                    per_tensor[name] = int(mask.sum())
                tensors[name] = tensor
        save_file(tensors, str(out / shard.name), metadata=metadata)
    for item in plan.finetuned.folder.iterdir():
        if item.suffix != ".safetensors" and item.is_file() and not item.name.startswith("."):
            shutil.copy2(item, out / item.name)
    return {"rewound": sum(per_tensor.values()), "per_tensor": per_tensor}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from .cli import add_run_arguments

    add_run_arguments(parser)
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
    staging = staging_dir(args.out)
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
