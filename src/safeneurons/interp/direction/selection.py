"""Selecting the direction as the original does. For each candidate (position, layer), with its unit direction r̂:
bypass = mean refusal score of the harmful validation prompts with r̂ ablated everywhere; induce = mean refusal
score of the harmless ones with the raw mean difference added at that layer's input; KL = mean KL(baseline ‖
ablated) of the harmless prompts' last-position distributions. Candidates from the last `prune_layer_fraction` of
the layers, with KL above the threshold, induce below its threshold or a NaN are discarded; the lowest bypass wins.

Candidates are scored `candidates_per_pass` at a time in one forward pass (the prompt batch repeated, each copy
edited with its own direction); the passes are split across ranks and gathered in order.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn

from safeneurons.errors import SafeneuronsError
from safeneurons.interp.direction import hooks
from safeneurons.interp.direction.candidates import Candidates, encode, last_logits
from safeneurons.models.structure import model_device
from safeneurons.runtime.distributed import map_fixed_batches


@dataclass(frozen=True)
class SelectionConfig:
    kl_threshold: float = 0.1  # the original's defaults
    induce_threshold: float = 0.0
    prune_layer_fraction: float = 0.2
    batch_size: int = 16  # prompts per pass
    candidates_per_pass: int = 8

    def validate(self) -> None:
        if not self.kl_threshold >= 0 or not 0 <= self.prune_layer_fraction < 1:
            raise SafeneuronsError(f"--kl-threshold {self.kl_threshold} must be >= 0 and --prune-layer-fraction "
                                   f"{self.prune_layer_fraction} in [0, 1)")
        if self.batch_size < 1 or self.candidates_per_pass < 1:
            raise SafeneuronsError(f"--batch-size {self.batch_size} and --candidates-per-pass "
                                   f"{self.candidates_per_pass} must be positive")


@dataclass
class CandidateScore:
    position: int
    layer: int
    refusal_score: float  # bypass: the harmful prompts' mean refusal score under ablation (the original's name)
    steering_score: float  # induce: the harmless prompts' mean refusal score under addition
    kl_div_score: float
    discarded: str | None = None  # why the filter discarded it


def kl_divergence(base_logits: torch.Tensor, edited_logits: torch.Tensor) -> torch.Tensor:
    """KL(base ‖ edited) per row, in float64 from log-probabilities (exact where the original adds 1e-6)."""
    base = torch.log_softmax(base_logits.double(), dim=-1)
    edited = torch.log_softmax(edited_logits.double(), dim=-1)
    return (base.exp() * (base - edited)).sum(-1)


def _chunks(count: int, size: int) -> list[list[int]]:
    return [list(range(start, min(start + size, count))) for start in range(0, count, size)]


def _over_passes(units: list[Any], run: Any, desc: str) -> list[torch.Tensor]:
    """`run(unit)` → [copies, B] for each unit (a fixed batch of prompts and candidates), split across ranks."""
    return map_fixed_batches(len(units), 1, lambda picked: [run(units[i]) for i in picked], desc=desc)


def _means(per_unit: list[torch.Tensor], chunks: list[list[int]], n_batches: int, count: int) -> list[float]:
    """Per candidate, the float64 mean over every prompt (units are ordered chunk-major, batch-minor)."""
    means = [0.0] * count
    for chunk_index, chunk in enumerate(chunks):
        rows = torch.cat([per_unit[chunk_index * n_batches + batch] for batch in range(n_batches)], dim=1).double()
        for offset, candidate in enumerate(chunk):
            means[candidate] = float(rows[offset].mean())
    return means


def score_candidates(model: nn.Module, tokenizer: Any, candidates: Candidates, harmful: Sequence[str],
                     harmless: Sequence[str], refusal: Any, config: SelectionConfig) -> list[CandidateScore]:
    """Bypass, induce and KL of every candidate, in (position, layer) order."""
    device = model_device(model)
    n_layers = candidates.directions.shape[1]
    keys = [(position, layer) for position in candidates.positions for layer in range(n_layers)]
    raw = torch.stack([candidates.at(position, layer) for position, layer in keys]).float()
    chunks = _chunks(len(keys), config.candidates_per_pass)
    batches = {name: [list(prompts[start:start + config.batch_size])
                      for start in range(0, len(prompts), config.batch_size)]
               for name, prompts in (("harmful", harmful), ("harmless", harmless))}

    def bypass(unit: tuple[int, int]) -> torch.Tensor:
        chunk, inputs = chunks[unit[0]], encode(tokenizer, batches["harmful"][unit[1]], device)
        with hooks.ablation(model, raw[chunk]):
            return refusal.compute(last_logits(model, inputs, len(chunk)), None).view(len(chunk), -1)

    def kl(unit: tuple[int, int]) -> torch.Tensor:
        chunk, inputs = chunks[unit[0]], encode(tokenizer, batches["harmless"][unit[1]], device)
        base = last_logits(model, inputs).repeat(len(chunk), 1)
        with hooks.ablation(model, raw[chunk]):
            return kl_divergence(base, last_logits(model, inputs, len(chunk))).view(len(chunk), -1)

    def induce(unit: tuple[int, int]) -> torch.Tensor:
        chunk, inputs = chunks[unit[0]], encode(tokenizer, batches["harmless"][unit[1]], device)
        with hooks.addition(model, raw[chunk], [keys[i][1] for i in chunk]):
            return refusal.compute(last_logits(model, inputs, len(chunk)), None).view(len(chunk), -1)

    scores = {}
    for name, run, prompts in (("bypass", bypass, "harmful"), ("kl", kl, "harmless"), ("induce", induce, "harmless")):
        units = [(chunk, batch) for chunk in range(len(chunks)) for batch in range(len(batches[prompts]))]
        scores[name] = _means(_over_passes(units, run, desc=f"selection: {name}"), chunks, len(batches[prompts]),
                              len(keys))
    return [CandidateScore(position, layer, scores["bypass"][i], scores["induce"][i], scores["kl"][i])
            for i, (position, layer) in enumerate(keys)]


def discard_reason(score: CandidateScore, n_layers: int, config: SelectionConfig) -> str | None:
    """The original's filter, in its order."""
    if any(math.isnan(value) for value in (score.refusal_score, score.steering_score, score.kl_div_score)):
        return "NaN score"
    if score.layer >= int(n_layers * (1.0 - config.prune_layer_fraction)):
        return f"layer >= {int(n_layers * (1.0 - config.prune_layer_fraction))}"
    if score.kl_div_score > config.kl_threshold:
        return f"KL > {config.kl_threshold:g}"
    if score.steering_score < config.induce_threshold:
        return f"induce < {config.induce_threshold:g}"
    return None


def select(scores: Sequence[CandidateScore], n_layers: int, config: SelectionConfig) -> CandidateScore:
    """The kept candidate of lowest bypass score (the first in (position, layer) order on a tie)."""
    for score in scores:
        score.discarded = discard_reason(score, n_layers, config)
    kept = [score for score in scores if score.discarded is None]
    if not kept:
        reasons: dict[str, int] = {}
        for score in scores:
            reasons[score.discarded] = reasons.get(score.discarded, 0) + 1
        counted = ", ".join(f"{count} for {why}" for why, count in reasons.items())
        raise SafeneuronsError(f"the filter discarded all {len(scores)} candidates ({counted}): loosen "
                               f"--kl-threshold, --induce-threshold or --prune-layer-fraction")
    return min(kept, key=lambda score: score.refusal_score)


def evaluations_json(scores: Sequence[CandidateScore]) -> list[dict]:
    return [asdict(score) for score in scores]
