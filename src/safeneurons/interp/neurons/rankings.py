"""The rankings the neuron study compares, each a score per MLP neuron of the aligned model per layer (higher =
more safety-critical): our weight scores (`wandg`, `wanda`) summed over the neuron's gate and up rows, their set
difference against utility, and Chen et al.'s activation contrast (`contrast.py`). On an MoE layer the neurons are
every expert's units (expert e's unit j at e·intermediate + j)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from safeneurons.masks.neurons import neuron_scores, top_fraction
from safeneurons.models.structure import scored_linears
from safeneurons.runtime import distributed

if TYPE_CHECKING:
    from safeneurons.models.moe import ExpertBank
    from safeneurons.scores.config import ScoreConfig

WEIGHT_METHODS = ("wandg", "wanda")


def weight_ranking(model: nn.Module, tokenizer: Any, config: ScoreConfig) -> dict[int, torch.Tensor]:
    """Collective: each MLP neuron's score (`config.method` on `config.data`; its sparsity ratio plays no part);
    every rank gets every layer. Ranks score different layers, so each sends only its rows' sums (a number per
    row, not the whole matrices)."""
    from dataclasses import replace

    from safeneurons.scores.schedules import score_model

    scores = score_model(model, tokenizer, replace(config, keep_scores=True)).scores
    experts = {linear.param_name: linear for linear in scored_linears(model) if linear.expert_matrix == "gate_up"}
    row_sums = {name: value.float().sum(1, keepdim=True) for name, value in scores.items()
                if ".mlp." in name and name not in experts}
    units = {experts[name].layer: expert_unit_scores(experts[name].experts, value)
             for name, value in scores.items() if name in experts}
    merged: dict[str, torch.Tensor] = {}
    merged_units: dict[int, torch.Tensor] = {}
    for part, part_units in distributed.all_gather((row_sums, units)):
        merged.update(part)
        merged_units.update(part_units)
    return {**neuron_scores(merged, model.config), **merged_units}


def expert_unit_scores(bank: ExpertBank, scores: torch.Tensor) -> torch.Tensor:
    """[E × intermediate]: each expert unit's score, the sum of its gate and up rows of `gate_up_proj` (expert e's
    unit j at e·intermediate + j, as the MoE layer's `mlp_neuron` site numbers them)."""
    rows = bank.canonical(scores.float()).sum(dim=-1)  # [E, 2I]
    return (rows[:, bank.gate_up_rows("gate")] + rows[:, bank.gate_up_rows("up")]).reshape(-1)


def set_difference(safety: Mapping[int, torch.Tensor], utility: Mapping[int, torch.Tensor],
                   p: float) -> dict[int, torch.Tensor]:
    """The safety ranking with each layer's top-`p` utility neurons moved below all the others (keeping their
    order): the top k% of it are safety-critical neurons outside the utility set, as long as there are enough."""
    excluded = top_fraction(utility, p)
    ranked = {}
    for layer, values in safety.items():
        shifted = values.double().clone()
        shifted[excluded[layer]] -= float(values.max() - values.min()) + 1.0
        ranked[layer] = shifted
    return ranked
