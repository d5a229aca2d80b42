"""The refusal direction and the safety-critical weights a mask selects, in the matrices that write to the residual
stream (every `o_proj` and `down_proj`):

(a) alignment — of the masked weights' output columns, the fraction of their squared norm along r̂, against the
    unmasked weights and a random mask of the same count per matrix (a direction unrelated to r̂ gets ≈ 1/hidden);
(c) carrying — r̂ projected out of the masked weights only, of a random mask's weights only, and of all writing
    weights (full orthogonalization): the refusal score and keyword ASR on the held-out harmful prompts after each.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from safeneurons.interventions.orthogonalize import WRITES, orthogonal_tensor, orthogonalize_model
from safeneurons.masks.apply import random_like_counts

RANDOM_MASK_SEED = 0


def write_masks(masks: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The mask's entries for the matrices that write to the residual stream (weights, not biases)."""
    names = {name for name, _ in model.named_parameters() if WRITES.search(name) and name.endswith(".weight")}
    return {name: mask.bool() for name, mask in masks.items() if name in names}


def _energy(weight: torch.Tensor, mask: torch.Tensor, unit: torch.Tensor) -> tuple[float, float]:
    kept = torch.where(mask, weight.double(), torch.zeros((), dtype=torch.float64))
    return float((unit @ kept).pow(2).sum()), float(kept.pow(2).sum())


def alignment(model: nn.Module, masks: Mapping[str, torch.Tensor], direction: torch.Tensor) -> dict[str, Any]:
    """(a): the fraction of squared norm along r̂ of the masked, unmasked and random-mask weights."""
    unit = direction.double() / direction.double().norm()
    weights = dict(model.named_parameters())
    random_masks = random_like_counts(masks, RANDOM_MASK_SEED)
    totals = {"masked": [0.0, 0.0], "unmasked": [0.0, 0.0], "random_mask": [0.0, 0.0]}
    for name, mask in masks.items():
        weight = weights[name].detach()
        for kind, chosen in (("masked", mask), ("unmasked", ~mask), ("random_mask", random_masks[name])):
            along, total = _energy(weight, chosen, unit)
            totals[kind][0] += along
            totals[kind][1] += total
    fractions = {kind: (along / total if total else None) for kind, (along, total) in totals.items()}
    return {**fractions, "uniform_expectation": 1.0 / unit.numel(), "n_masked": int(sum(int(m.sum()) for m in
                                                                                          masks.values())),
            "matrices": len(masks)}


def _edited(model: nn.Module, masks: Mapping[str, torch.Tensor] | None, direction: torch.Tensor) -> dict[str, torch.Tensor]:
    """Orthogonalize (all writes, or the masked elements only) and return the originals of what changed."""
    parameters = dict(model.named_parameters())
    if masks is None:
        saved = {name: tensor.detach().clone() for name, tensor in parameters.items()
                 if WRITES.search(name) or name.endswith("embed_tokens.weight")}
        saved["__tied__"] = torch.tensor(bool(model.config.tie_word_embeddings))
        saved["__output__"] = model.get_output_embeddings().weight
        orthogonalize_model(model, direction)
        return saved
    saved = {name: parameters[name].detach().clone() for name in masks}
    unit = direction.double() / direction.double().norm()
    with torch.no_grad():
        for name, mask in masks.items():
            parameters[name].copy_(orthogonal_tensor(name, parameters[name], unit, mask))
    return saved


def _restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    parameters = dict(model.named_parameters(remove_duplicate=False))
    output = saved.pop("__output__", None)
    tied = saved.pop("__tied__", None)
    with torch.no_grad():
        for name, tensor in saved.items():
            parameters[name].copy_(tensor)
    if output is not None:
        model.get_output_embeddings().weight = output
        model.config.tie_word_embeddings = bool(tied)


def masked_share(masks: Mapping[str, torch.Tensor], model: nn.Module, direction: torch.Tensor) -> float:
    """The masked elements' share of the full orthogonalization's squared change of the writing matrices."""
    unit = direction.double() / direction.double().norm()
    weights = dict(model.named_parameters())
    inside = total = 0.0
    for name, mask in masks.items():
        change = (weights[name].detach().double() - orthogonal_tensor(name, weights[name].detach(), unit).double())
        inside += float(change[mask].pow(2).sum())
        total += float(change.pow(2).sum())
    return inside / total if total else 0.0


def carrying(model: nn.Module, masks: Mapping[str, torch.Tensor], direction: torch.Tensor,
             measure: Any) -> dict[str, Any]:
    """(c): `measure(model)` (refusal score, ASR) after projecting r̂ out of each weight set, the model restored
    after each."""
    results = {"none": measure(model), "masked_share_of_full_change": masked_share(masks, model, direction)}
    for name, chosen in (("masked_only", masks), ("random_mask_only", random_like_counts(masks, RANDOM_MASK_SEED)),
                         ("all", None)):
        saved = _edited(model, chosen, direction)
        try:
            results[name] = measure(model)
        finally:
            _restore(model, saved)
    return results


def links(model: nn.Module, masks: Mapping[str, torch.Tensor], direction: torch.Tensor, measure: Any,
          mask_source: str) -> dict[str, Any]:
    selected = write_masks(masks, model)
    return {"masks": mask_source, "alignment": alignment(model, selected, direction),
            "carrying": carrying(model, selected, direction, measure)}

