"""`safeneurons defend --method resta`: RESTA (Bhardwaj et al. 2024, arXiv 2402.11746), the safety vector added back
to a fine-tuned model,

    θ = θ_ft + scale · (θ_aligned − θ_unaligned),

optionally after DARE on the fine-tuning delta (θ_ft − θ_aligned: each element dropped with probability `dare_drop`
and the rest rescaled by 1 / (1 − dare_drop)), which the paper uses for parameter-efficient fine-tuning. The
paper's un-aligned model is the aligned one fine-tuned on harmful answers; the pre-alignment base model (the demo's
`demo-base`) is the other natural choice, and either can be given. Works on the safetensors files tensor by tensor
(as `rewind` does), in float32, every floating tensor (embeddings and norms too, as task arithmetic does).

Departure: DARE's keep mask is `rand ≥ drop` from a seeded generator, tensor by tensor, where the reference draws
`torch.bernoulli` masks: the same distribution (each element kept with probability 1 − drop), not the same draws,
so a DARE run equals the reference in law, not bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safeneurons.errors import SafeneuronsError
from safeneurons.models.loading import open_matching_checkpoints
from safeneurons.runtime.checkpoints import CheckpointFiles, rewrite_checkpoint, write_on_main
from safeneurons.runtime.outputs import check_output_dir

SUMMARY_FILE = "resta_summary.json"
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclass(frozen=True)
class RestaConfig:
    finetuned: str  # the compromised model (folder, HF id in the cache, alias)
    aligned: str  # the model it was fine-tuned from
    unaligned: str  # the other end of the safety vector: the base model, or the aligned one made harmful
    scale: float = 1.0  # the safety vector's coefficient; 0 leaves the fine-tuned model as it is
    dare_drop: float = 0.0  # DARE's drop probability on the fine-tuning delta; 0 = no DARE
    seed: int = 0  # DARE's drops
    cache_dir: str | None = None

    def validate(self) -> None:
        if not math.isfinite(self.scale):
            raise SafeneuronsError(f"--resta-scale {self.scale!r} must be a finite number")
        if not 0 <= self.dare_drop < 1:
            raise SafeneuronsError(f"--dare-drop {self.dare_drop!r} must lie in [0, 1)")


@dataclass
class RestaResult:
    tensors: int  # floating tensors moved along the safety vector
    safety_vector_norm: float  # ‖θ_aligned − θ_unaligned‖ over those tensors
    dropped: int  # delta elements DARE set to zero

    def to_json(self, config: RestaConfig) -> dict[str, Any]:
        return {"method": "resta", "tensors": self.tensors, "safety_vector_norm": self.safety_vector_norm,
                "dare_dropped": self.dropped, "scale": config.scale, "dare_drop": config.dare_drop,
                "seed": config.seed, "finetuned": config.finetuned, "aligned": config.aligned,
                "unaligned": config.unaligned}


def open_checkpoints(config: RestaConfig) -> tuple[CheckpointFiles, CheckpointFiles, CheckpointFiles]:
    """(fine-tuned, aligned, unaligned), checked from file headers to hold the same tensors."""
    config.validate()
    aligned, finetuned, other = open_matching_checkpoints(
        {"--aligned": config.aligned, "--finetuned": config.finetuned, "--unaligned": config.unaligned},
        config.cache_dir)
    return finetuned, aligned, other


def dare(delta: torch.Tensor, drop: float, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """DARE (Yu et al. 2024): drop each element with probability `drop`, rescale the kept ones by 1 / (1 − drop)."""
    keep = torch.rand(delta.shape, generator=generator) >= drop
    return torch.where(keep, delta / (1 - drop), torch.zeros_like(delta)), int((~keep).sum())


def restore_safety(finetuned: CheckpointFiles, aligned: CheckpointFiles, unaligned: CheckpointFiles,
                   config: RestaConfig, out: Path) -> RestaResult:
    """Write θ_ft (DARE'd) + scale · (θ_aligned − θ_unaligned) into `out`, tensor by tensor."""
    floating = sorted(name for name, (_, dtype) in aligned.metadata().items() if dtype in FLOAT_DTYPES)
    stream = {name: index for index, name in enumerate(floating)}  # DARE's drops do not depend on the sharding
    squared, dropped = [0.0], [0]

    def edit(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name not in stream:
            return tensor
        base = aligned.get(name).float()
        vector = base - unaligned.get(name).float()
        squared[0] += float(vector.double().square().sum())
        if config.scale == 0 and config.dare_drop == 0:  # the off setting: the fine-tuned bits, -0.0 included
            return tensor
        moved = tensor.float()
        if config.dare_drop > 0:
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + stream[name])
            delta, count = dare(moved - base, config.dare_drop, generator)
            moved, dropped[0] = base + delta, dropped[0] + count
        return (moved + config.scale * vector).to(tensor.dtype)

    rewrite_checkpoint(finetuned, out, edit)
    return RestaResult(len(floating), math.sqrt(squared[0]), dropped[0])


def run_resta(config: RestaConfig, out: str | Path) -> RestaResult | None:
    """The re-aligned model as an HF folder at `out` with resta_summary.json, staged and published with one rename.
    File work: rank 0 does it (None on the other ranks)."""
    check_output_dir(out)
    checkpoints = open_checkpoints(config)
    return write_on_main(out, lambda staging: restore_safety(*checkpoints, config, staging), SUMMARY_FILE,
                         lambda result: result.to_json(config))
