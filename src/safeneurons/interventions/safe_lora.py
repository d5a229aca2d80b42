"""`safeneurons defend --method safe_lora`: Safe LoRA (Hsu et al. 2024, arXiv 2405.16833), the fine-tuning update of
a layer projected onto the alignment subspace where it strays from it.

Per weight matrix i that fine-tuning changed (with LoRA: the adapted ones), from the aligned model, its base and the
fine-tuned model:

    V_i = W_aligned − W_base,   C_i = V_i V_iᵀ / ‖V_i‖_F,   ΔW_i = W_ft − W_aligned,
    similarity_i = ⟨ΔW_i, C_i ΔW_i⟩_F / (‖ΔW_i‖_F ‖C_i ΔW_i‖_F)

and a selected layer gets W_aligned + C_i ΔW_i. The paper's two selection rules, as the authors' code applies them
(one bound, every layer with similarity ≤ it): `number`, their default (k = 10: the bound is the k-th smallest
similarity, so layers tied with it are projected too, and more than k can be), and `threshold` (the bound is τ;
similarities lie in [0, 1], since C_i is positive semi-definite). Similarities are computed in float32 from the
files as saved: merged weights saved in bf16 move them by up to 1e-2, which can change the selection near the
bound. The paper projects LoRA's B (C·B·A = C·ΔW); this works on the merged
weights that `finetune --lora-r` saves, which is the same product. C_i ΔW_i is computed as V_i (V_iᵀ ΔW_i) / ‖V_i‖_F,
so no d_out × d_out matrix is formed (an lm_head's would be vocabulary²).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safeneurons.errors import SafeneuronsError
from safeneurons.models.loading import open_matching_checkpoints
from safeneurons.runtime.checkpoints import CheckpointFiles, rewrite_checkpoint, write_on_main
from safeneurons.runtime.outputs import check_output_dir

log = logging.getLogger(__name__)
SUMMARY_FILE = "safe_lora_summary.json"
SELECTIONS = ("threshold", "number")
DEFAULT_THRESHOLD = 0.5
DEFAULT_LAYERS = 10


@dataclass(frozen=True)
class SafeLoraConfig:
    finetuned: str  # the LoRA fine-tuned model, adapters merged (what `finetune --lora-r` saves)
    aligned: str  # the model it was fine-tuned from
    base: str  # the model before alignment (--base-model)
    selection: str = "number"  # the authors' default
    threshold: float = DEFAULT_THRESHOLD  # τ, for selection "threshold"
    layers: int = DEFAULT_LAYERS  # k, for selection "number"
    cache_dir: str | None = None

    def validate(self) -> None:
        if self.selection not in SELECTIONS:
            raise SafeneuronsError(f"--safe-lora-selection {self.selection!r} is not one of {', '.join(SELECTIONS)}")
        if not 0 <= self.threshold <= 1:
            raise SafeneuronsError(f"--safe-lora-threshold {self.threshold!r} must lie in [0, 1] (a cosine "
                                   f"similarity of a PSD projection)")
        if self.layers < 0:
            raise SafeneuronsError(f"--safe-lora-layers {self.layers} must be a non-negative number of layers")


@dataclass
class SafeLoraResult:
    similarities: dict[str, float]  # every changed matrix with a non-zero alignment matrix
    projected: list[str]  # the selected ones, now W_aligned + C ΔW

    def to_json(self, config: SafeLoraConfig) -> dict[str, Any]:
        return {"method": "safe_lora", "selection": config.selection, "threshold": config.threshold,
                "layers": config.layers, "projected": self.projected, "similarities": self.similarities,
                "finetuned": config.finetuned, "aligned": config.aligned, "base": config.base}


def open_checkpoints(config: SafeLoraConfig) -> tuple[CheckpointFiles, CheckpointFiles, CheckpointFiles]:
    """(fine-tuned, aligned, base), checked from file headers to hold the same tensors."""
    config.validate()
    aligned, finetuned, other = open_matching_checkpoints(
        {"--aligned": config.aligned, "--finetuned": config.finetuned, "--base-model": config.base}, config.cache_dir)
    return finetuned, aligned, other


def project(alignment: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """C ΔW with C = V Vᵀ / ‖V‖_F, as V (Vᵀ ΔW) / ‖V‖_F."""
    return alignment @ (alignment.T @ update) / torch.linalg.matrix_norm(alignment)


def similarity(update: torch.Tensor, projected: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(update.flatten(), projected.flatten(), dim=0))


def layer_terms(name: str, finetuned: CheckpointFiles, aligned: CheckpointFiles, base: CheckpointFiles
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(ΔW, C ΔW) in float32 for a matrix fine-tuning changed and alignment moved; None otherwise."""
    start = aligned.get(name).float()
    update = finetuned.get(name).float() - start
    alignment = start - base.get(name).float()
    if not update.any() or not alignment.any():
        return None
    return update, project(alignment, update)


def select(similarities: dict[str, float], config: SafeLoraConfig) -> list[str]:
    """Every matrix whose similarity is at most the bound: τ, or the k-th smallest similarity (ties included)."""
    if config.selection == "number":
        if config.layers == 0 or not similarities:
            return []
        bound = sorted(similarities.values())[:config.layers][-1]
    else:
        bound = config.threshold
    return sorted(name for name, value in similarities.items() if value <= bound)


def project_files(finetuned: CheckpointFiles, aligned: CheckpointFiles, base: CheckpointFiles,
                  config: SafeLoraConfig, out: Path) -> SafeLoraResult:
    """Two passes: the similarity of every changed matrix, then the rewrite with the selected ones projected."""
    matrices = [name for name, (shape, _) in aligned.metadata().items() if len(shape) == 2]
    similarities = {}
    for name in matrices:
        terms = layer_terms(name, finetuned, aligned, base)
        if terms is not None:
            similarities[name] = similarity(*terms)
    chosen = set(select(similarities, config))
    log.info("Safe LoRA: %d of %d changed matrices projected", len(chosen), len(similarities))

    def edit(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name not in chosen:
            return tensor
        _, projected = layer_terms(name, finetuned, aligned, base)
        return (aligned.get(name).float() + projected).to(tensor.dtype)

    rewrite_checkpoint(finetuned, out, edit)
    return SafeLoraResult(similarities, sorted(chosen))


def run_safe_lora(config: SafeLoraConfig, out: str | Path) -> SafeLoraResult | None:
    """The projected model as an HF folder at `out` with safe_lora_summary.json, staged and published with one
    rename. File work: rank 0 does it (None on the other ranks)."""
    check_output_dir(out)
    checkpoints = open_checkpoints(config)
    return write_on_main(out, lambda staging: project_files(*checkpoints, config, staging), SUMMARY_FILE,
                         lambda result: result.to_json(config))
