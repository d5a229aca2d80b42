"""`safeneurons rewind`: a fine-tuned model with its masked elements set back to the original model's values
(Wei et al. 2024's check that the found weights carry the safety that fine-tuning removed).

Works on the safetensors files directly, one shard of the fine-tuned model at a time and one tensor of the
original at a time, so neither model is ever whole in memory; the other files of the fine-tuned folder (config,
tokenizer, index) are copied as they are.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safeneurons.masks.io import MaskReader, check_masks_fit
from safeneurons.models.loading import open_matching_checkpoints
from safeneurons.runtime.checkpoints import CheckpointFiles, rewrite_checkpoint, write_on_main
from safeneurons.runtime.outputs import check_output_dir

log = logging.getLogger(__name__)
SUMMARY_FILE = "rewind_summary.json"


@dataclass(frozen=True)
class RewindConfig:
    original: str  # the model before fine-tuning (folder, HF id in the cache, alias, demo)
    finetuned: str
    masks: str  # the mask file or folder whose elements go back to the original's values
    cache_dir: str | None = None


@dataclass
class RewindInputs:
    """The two checkpoints and the masks, opened and checked against each other."""

    original: CheckpointFiles
    finetuned: CheckpointFiles
    masks: MaskReader


@dataclass
class RewindResult:
    rewound: int  # elements set back
    per_tensor: dict[str, int]

    def to_json(self, config: RewindConfig) -> dict[str, Any]:
        return {"rewound": self.rewound, "per_tensor": self.per_tensor, "original": config.original,
                "finetuned": config.finetuned, "masks": str(config.masks)}


def open_inputs(config: RewindConfig) -> RewindInputs:
    """Check, from file headers only, that both models have the same tensors (names, shapes, dtypes) and that
    every mask fits one of them; the error names the first misfit."""
    original, finetuned = open_matching_checkpoints({"--original": config.original, "--finetuned": config.finetuned},
                                                    config.cache_dir)
    inputs = RewindInputs(original, finetuned, MaskReader(config.masks))
    check_masks_fit(inputs.masks.shapes(), {name: shape for name, (shape, _) in original.metadata().items()})
    return inputs


def rewind_files(inputs: RewindInputs, out: Path) -> RewindResult:
    """Write the rewound weights (and copies of the fine-tuned folder's other files) into `out`."""
    per_tensor: dict[str, int] = {}
    masked = set(inputs.masks.names)

    def rewind_tensor(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name not in masked:
            return tensor
        mask = inputs.masks.get(name)
        per_tensor[name] = int(mask.sum())
        return torch.where(mask, inputs.original.get(name), tensor)

    rewrite_checkpoint(inputs.finetuned, out, rewind_tensor)
    return RewindResult(sum(per_tensor.values()), per_tensor)


def run_rewind(config: RewindConfig, out: str | Path) -> RewindResult | None:
    """The rewound model as an HF folder at `out` with rewind_summary.json, staged and published with one rename.
    File work: rank 0 does it (None on the other ranks)."""
    check_output_dir(out)
    inputs = open_inputs(config)
    return write_on_main(out, lambda staging: rewind_files(inputs, staging), SUMMARY_FILE,
                         lambda result: result.to_json(config))
