"""SPPFT's safety layers (Li et al. 2024, arXiv 2408.17003): the contiguous decoder layers where an aligned model
starts to tell harmful queries from harmless ones, found from the cosine similarity of last-position hidden states.

Per layer l, over the outputs h_l of the last prompt position:

    s_NN(l) = mean cos(h_l(n_i), h_l(n_j)), i < j        (pairs of harmless queries)
    s_NM(l) = mean cos(h_l(n_i), h_l(m_j))               (harmless × harmful)
    gap(l)  = s_NN(l) − s_NM(l)

The paper reads the lower bound off the curves where the gap first appears and the first upper bound where it first
peaks. Here that reading is a rule: the first layer whose gap reaches `onset` × the largest gap, then the first
local maximum at or after it. The paper then moves the upper bound by scaling the candidate layers' weights and
measuring over-rejection; that refinement is not done here (the closing note of issue 29 says so). The result is
written as whole-layer masks (every parameter of the safety layers), so `finetune --masks` is SPPFT's fine-tuning
with those layers frozen, bit for bit.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from safeneurons.data.readers import check_sources
from safeneurons.data.samples import load_prompts
from safeneurons.errors import SafeneuronsError
from safeneurons.interp.direction.candidates import batched, encode
from safeneurons.masks.io import save_masks
from safeneurons.models.loading import load_for_inference
from safeneurons.models.structure import decoder_layers, model_device
from safeneurons.runtime import distributed
from safeneurons.runtime.outputs import check_output_dir, staged, write_json

log = logging.getLogger(__name__)
SUMMARY_FILE = "safety_layers.json"
DEFAULT_ONSET = 0.1


@dataclass(frozen=True)
class SafetyLayersConfig:
    model: str
    harmful_data: str
    harmless_data: str
    limit: int = 50  # prompts of each set
    onset: float = DEFAULT_ONSET  # the gap's onset, as a fraction of its largest value
    batch_size: int = 8
    dtype: str = "float32"
    data_dir: str | None = None
    cache_dir: str | None = None

    def validate(self) -> None:
        if not 0 < self.onset <= 1:
            raise SafeneuronsError(f"--gap-onset {self.onset!r} must lie in (0, 1]")
        if self.limit < 2:
            raise SafeneuronsError(f"--limit {self.limit} must be at least 2 prompts of each set (pairs)")
        if self.batch_size < 1:
            raise SafeneuronsError(f"--batch-size {self.batch_size} must be a positive integer")


@dataclass
class SafetyLayersResult:
    first: int  # the safety layers, first and last (inclusive)
    last: int
    harmless_similarity: list[float]  # s_NN per layer
    mixed_similarity: list[float]  # s_NM per layer
    gap: list[float]

    @property
    def layers(self) -> list[int]:
        return list(range(self.first, self.last + 1))

    def to_json(self, config: SafetyLayersConfig) -> dict[str, Any]:
        return {"method": "sppft", "safety_layers": self.layers, "first": self.first, "last": self.last,
                "onset_found": self.first > 0,
                "gap": self.gap, "harmless_similarity": self.harmless_similarity,
                "mixed_similarity": self.mixed_similarity, "onset": config.onset, "limit": config.limit,
                "model": config.model, "harmful_data": config.harmful_data, "harmless_data": config.harmless_data}


def similarity_curves(harmless: torch.Tensor, harmful: torch.Tensor) -> tuple[list[float], list[float]]:
    """(s_NN, s_NM) per layer from last-position states [layers, prompts, hidden] of each set."""
    normal = torch.nn.functional.normalize(harmless.double(), dim=-1)
    other = torch.nn.functional.normalize(harmful.double(), dim=-1)
    count = normal.shape[1]
    within = normal @ normal.transpose(1, 2)
    pairs = torch.triu(torch.ones(count, count, dtype=torch.bool), diagonal=1)
    return within[:, pairs].mean(dim=1).tolist(), (normal @ other.transpose(1, 2)).mean(dim=(1, 2)).tolist()


def locate(gap: Sequence[float], onset: float) -> tuple[int, int]:
    """The first layer whose gap reaches onset × max(gap), and the first local maximum from there on."""
    peak = max(gap)
    if peak <= 0:
        raise SafeneuronsError("the harmful and harmless queries are no less similar to each other than harmless "
                               "ones are at any layer: no safety layers to locate (is the model aligned?)")
    first = next(layer for layer, value in enumerate(gap) if value >= onset * peak)
    last = first
    while last + 1 < len(gap) and gap[last + 1] > gap[last]:
        last += 1
    return first, last


def last_position_states(model: nn.Module, tokenizer: Any, prompts: Sequence[str], batch_size: int) -> torch.Tensor:
    """[layers, prompts, hidden]: every decoder layer's output at each prompt's last position (left padding)."""
    device = model_device(model)

    def run(indices: list[int]) -> list[torch.Tensor]:
        with torch.no_grad():
            hidden = model(**encode(tokenizer, [prompts[i] for i in indices], device), output_hidden_states=True,
                           use_cache=False).hidden_states[1:]
        return list(torch.stack([layer[:, -1].float().cpu() for layer in hidden], dim=1))

    return torch.stack(batched(len(prompts), batch_size, run, "hidden states"), dim=1)


def whole_layer_masks(model: nn.Module, layers: Sequence[int]) -> dict[str, torch.Tensor]:
    """Every parameter of the given decoder layers, all elements selected."""
    blocks = decoder_layers(model)
    prefix = {id(module): name for name, module in model.named_modules()}
    return {f"{prefix[id(blocks[layer])]}.{name}": torch.ones(param.shape, dtype=torch.bool)
            for layer in layers for name, param in blocks[layer].named_parameters()}


def run_safety_layers(config: SafetyLayersConfig, out: str | Path) -> SafetyLayersResult:
    """Collective: locate the safety layers and write their whole-layer masks and curves to `out` (rank 0)."""
    config.validate()
    check_output_dir(out)
    check_sources(config.harmful_data, config.harmless_data, directory=config.data_dir)
    context = distributed.init_distributed()
    loaded = load_for_inference(config.model, config.dtype, None, config.cache_dir, context.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = {name: load_prompts(source, tokenizer, config.limit, config.data_dir)
               for name, source in (("harmless", config.harmless_data), ("harmful", config.harmful_data))}
    states = {name: last_position_states(model, tokenizer, texts, config.batch_size) for name, texts in prompts.items()}
    within, mixed = similarity_curves(states["harmless"], states["harmful"])
    gap = [a - b for a, b in zip(within, mixed)]
    result = SafetyLayersResult(*locate(gap, config.onset), within, mixed, gap)
    log.info("safety layers %d-%d of %d", result.first, result.last, len(gap))
    if result.first == 0:
        log.warning("the cosine gap is already %.3g of its largest value at the first layer: the curve has no "
                    "onset to find (the paper's start near 0), so the first layers are selected by default; look "
                    "at safety_layers.json's gap before trusting them", gap[0] / max(gap))
    if distributed.is_main():
        with staged(out) as staging:
            save_masks(whole_layer_masks(model, result.layers), staging)
            write_json(staging / SUMMARY_FILE, result.to_json(config))
    distributed.barrier()
    return result
