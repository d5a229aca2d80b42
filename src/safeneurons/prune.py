"""`safeneurons prune`: the model with every masked element set to zero (Wei et al. 2024's removal of the
safety-critical weights), written as an HF folder that `from_pretrained` loads.

Without `--deepspeed` the model's safetensors files are rewritten shard by shard (each tensor keeps its dtype; one
shard in memory). Under N ranks with a ZeRO-3 config every rank zeroes the elements of its own partitions, reading only the rows
of the mask files that cover them (no rank holds a full-size mask), and the model is gathered for saving one
parameter at a time.
"""
from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed
from .checkpoints import CheckpointFiles, local_model_folder, rewrite_checkpoint
from .freezing import MaskSource, _MaskSource, local_layout, local_weights, named_parameters_with_shapes, \
    reduce_over_ranks
from .masks import MaskReader, check_masks_fit

log = logging.getLogger(__name__)
SUMMARY_FILE = "prune_summary.json"


@dataclass
class PruneSummary:
    pruned: int  # elements set to zero (whole model)
    total: int  # elements of the masked parameters
    per_parameter: dict[str, int]  # pruned elements per parameter

    def to_json(self) -> dict[str, Any]:
        return {"pruned": self.pruned, "total": self.total, "pruned_fraction": self.pruned / max(self.total, 1),
                "per_parameter": self.per_parameter}


def _persistent(param: nn.Parameter) -> bool:
    """A ZeRO-3 parameter small enough to be kept whole on every rank beside its partition."""
    return hasattr(param, "ds_id") and param.data.numel() == param.ds_numel


def zero_masked(name: str, param: nn.Parameter, source: _MaskSource, lowest: bool = False) -> int:
    """Zero the masked elements of the part of `param` this rank holds (and of the whole copy that a persistent
    ZeRO-3 parameter keeps, from its whole mask: such parameters are small); returns the count zeroed here."""
    shape = tuple(getattr(param, "ds_shape", param.shape))
    start, _, valid = local_layout(param)
    mask = source.elements(name, shape, start, start + valid) ^ lowest
    weights = local_weights(param)
    weights[:valid][mask.to(weights.device)] = 0
    if _persistent(param):
        whole = source.elements(name, shape, 0, param.ds_numel).view(shape) ^ lowest
        param.data[whole.to(param.device)] = 0
    return int(mask.sum())


def prune_model(model: nn.Module, masks: MaskSource, lowest: bool = False) -> PruneSummary:
    """Set every masked element of `model` to zero (with `lowest`, every element of a masked parameter that its
    mask does not select); collective under ZeRO-3. A mask that fits no parameter is an error naming it, raised
    before anything changes."""
    source = _MaskSource(masks)
    shapes = source.shapes()
    check_masks_fit(shapes, named_parameters_with_shapes(model))
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        counts = {name: int(reduce_over_ranks(float(zero_masked(name, parameters[name], source, lowest))))
                  for name in shapes}
    total = sum(math.prod(shape) for shape in shapes.values())
    return PruneSummary(sum(counts.values()), total, counts)


def prune_files(model: str, masks: str, out: Path, cache_dir: str | None = None, lowest: bool = False) -> PruneSummary:
    """The streaming prune: the model's safetensors files rewritten shard by shard with the masked elements set to
    zero (each tensor keeps its dtype); one shard in memory at a time."""
    reader = MaskReader(masks)
    counts: dict[str, int] = {}

    def prune(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name not in reader.weight_map:
            return tensor
        mask = reader.get(name) ^ lowest
        counts[name] = int(mask.sum())
        return tensor.masked_fill(mask, 0)

    rewrite_checkpoint(CheckpointFiles(local_model_folder(model, cache_dir)), out, prune)
    shapes = reader.shapes()
    return PruneSummary(sum(counts.values()), sum(math.prod(shape) for shape in shapes.values()), counts)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from .cli import add_model_arguments, add_run_arguments

    add_model_arguments(parser, "--model")
    add_run_arguments(parser, seeded=False)
    parser.add_argument("--masks", required=True, help="mask file or folder (from `safeneurons score`)")
    parser.add_argument("--lowest", action="store_true",
                        help="zero the elements of the masked parameters that the mask does NOT select: with masks "
                             "of the top (1 − s) fraction, the original's pruning of the lowest-scored s")


def run(args: argparse.Namespace) -> int:
    from .models import load_for_inference, model_skeleton, save_hf_folder
    from .outputs import check_output_dir, discard_staging, publish_dir, staging_dir, write_json

    check_output_dir(args.out)
    reader = MaskReader(args.masks)  # bad mask files and misfits fail here, before any weight is read
    check_masks_fit(reader.shapes(), named_parameters_with_shapes(model_skeleton(args.model, args.cache_dir)))
    settings = {"model": args.model, "masks": str(args.masks), "lowest": args.lowest}
    if args.deepspeed is None:  # no partitions to share: stream the files (one process does it)
        if distributed.is_main():
            staging = staging_dir(args.out, fresh=True)
            try:
                summary = prune_files(args.model, args.masks, staging, args.cache_dir, args.lowest)
                write_json(staging / SUMMARY_FILE, {**summary.to_json(), **settings, "mode": "streaming files"})
                publish_dir(args.out)
            except BaseException:
                discard_staging(args.out)
                raise
            _report(summary, args.out)
        return 0
    context = distributed.init_distributed(require_process_group=True)
    loaded = load_for_inference(args.model, args.dtype, args.deepspeed, args.cache_dir, context.device)
    summary = prune_model(loaded.model, args.masks, args.lowest)
    save_hf_folder(loaded.model, loaded.tokenizer, args.out,
                   {SUMMARY_FILE: {**summary.to_json(), **settings, "mode": "ZeRO-3 partitions", "dtype": args.dtype,
                                   "world_size": distributed.world_size()}})
    if distributed.is_main():
        _report(summary, args.out)
    return 0


def _report(summary: PruneSummary, out: str) -> None:
    print(f"pruned {summary.pruned} of {summary.total} masked-parameter elements "
          f"({summary.pruned / max(summary.total, 1):.4%}) -> {out}")
