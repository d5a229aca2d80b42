"""`safeneurons prune`: the model with every masked element set to zero (Wei et al. 2024's removal of the
safety-critical weights), written as an HF folder that `from_pretrained` loads.

Without `--deepspeed` the model's safetensors files are rewritten shard by shard (each tensor keeps its dtype; one
shard in memory). Under N ranks with a ZeRO-3 config every rank zeroes the elements of its own partitions, reading only the rows
of the mask files that cover them (no rank holds a full-size mask), and the model is gathered for saving one
parameter at a time.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from safeneurons.errors import SafeneuronsError
from safeneurons.masks.apply import zero_masked
from safeneurons.masks.io import MaskReader, check_mask_file_fits, check_masks_fit
from safeneurons.masks.source import MaskElements
from safeneurons.models.loading import load_for_inference, local_model_folder, save_hf_folder
from safeneurons.runtime import distributed
from safeneurons.runtime.checkpoints import CheckpointFiles, rewrite_checkpoint
from safeneurons.runtime.distributed import reduce_over_ranks
from safeneurons.runtime.outputs import check_output_dir, staged, write_json
from safeneurons.runtime.zero3 import named_parameters_with_shapes

if TYPE_CHECKING:
    from safeneurons.masks.source import MaskSource

log = logging.getLogger(__name__)
SUMMARY_FILE = "prune_summary.json"


@dataclass
class PruneResult:
    pruned: int  # elements set to zero (whole model)
    total: int  # elements of the masked parameters
    per_parameter: dict[str, int]  # pruned elements per parameter

    def to_json(self) -> dict[str, Any]:
        return {"pruned": self.pruned, "total": self.total, "pruned_fraction": self.pruned / max(self.total, 1),
                "per_parameter": self.per_parameter}


def prune_model(model: nn.Module, masks: MaskSource, lowest: bool = False) -> PruneResult:
    """Set every masked element of `model` to zero (with `lowest`, every element of a masked parameter that its
    mask does not select); collective under ZeRO-3. A mask that fits no parameter is an error naming it, raised
    before anything changes."""
    source = MaskElements(masks)
    shapes = source.shapes()
    check_masks_fit(shapes, named_parameters_with_shapes(model))
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        counts = {name: int(reduce_over_ranks(float(zero_masked(name, parameters[name], source, lowest))))
                  for name in shapes}
    total = sum(math.prod(shape) for shape in shapes.values())
    return PruneResult(sum(counts.values()), total, counts)


def prune_files(model: str, masks: str, out: Path, cache_dir: str | None = None, lowest: bool = False,
                modules: tuple[str, ...] | None = None) -> PruneResult:
    """The streaming prune: the model's safetensors files rewritten shard by shard with the masked elements set to
    zero (each tensor keeps its dtype); one shard in memory at a time. With `modules`, only the masks of those
    Linears (by their module name, `q_proj`, …) are applied."""
    reader = MaskReader(masks)
    chosen = {name for name in reader.weight_map if modules is None or name.split(".")[-2] in modules}
    counts: dict[str, int] = {}

    def prune(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name not in chosen:
            return tensor
        mask = reader.get(name) ^ lowest
        counts[name] = int(mask.sum())
        return tensor.masked_fill(mask, 0)

    rewrite_checkpoint(CheckpointFiles(local_model_folder(model, cache_dir)), out, prune)
    shapes = reader.shapes()
    return PruneResult(sum(counts.values()), sum(math.prod(shapes[name]) for name in chosen), counts)


@dataclass(frozen=True)
class PruneConfig:
    model: str
    masks: str  # mask file or folder
    lowest: bool = False  # zero what the masks do NOT select (the original's pruning of the lowest-scored)
    dtype: str = "float32"  # of the partitioned model under ZeRO-3 (streaming keeps every tensor's dtype)
    deepspeed: str | None = None  # a ZeRO-3 config: prune the partitions of a loaded model instead of the files
    cache_dir: str | None = None

    def settings(self) -> dict[str, Any]:
        return {"model": self.model, "masks": str(self.masks), "lowest": self.lowest}

    def validate(self) -> None:
        if self.deepspeed is None and self.dtype != "float32":
            raise SafeneuronsError(f"--dtype {self.dtype} applies to the ZeRO-3 prune (--deepspeed); the streaming "
                                   f"prune keeps every tensor's dtype as the model's files have it")


def run_prune(config: PruneConfig, out: str | Path) -> PruneResult | None:
    """The pruned model as an HF folder at `out` with prune_summary.json (collective under ZeRO-3; the streaming
    prune is file work on rank 0). Mask misfits fail before any weight is read. The result on rank 0."""
    config.validate()
    check_output_dir(out)
    check_mask_file_fits(config.masks, config.model, config.cache_dir)
    if config.deepspeed is None:  # no partitions to share: stream the files (one process does it)
        if not distributed.is_main():
            return None
        with staged(out) as staging:
            result = prune_files(config.model, config.masks, staging, config.cache_dir, config.lowest)
            write_json(staging / SUMMARY_FILE, {**result.to_json(), **config.settings(), "mode": "streaming files"})
        return result
    context = distributed.init_distributed(require_process_group=True)
    loaded = load_for_inference(config.model, config.dtype, config.deepspeed, config.cache_dir, context.device)
    result = prune_model(loaded.model, config.masks, config.lowest)
    save_hf_folder(loaded.model, loaded.tokenizer, out,
                   {SUMMARY_FILE: {**result.to_json(), **config.settings(), "mode": "ZeRO-3 partitions",
                                   "dtype": config.dtype, "world_size": distributed.world_size()}})
    return result if distributed.is_main() else None
