"""The rankings the neuron study compares, each a score per MLP neuron of the aligned model per layer (higher =
more safety-critical): our weight scores (`wandg`, `wanda`) summed over the neuron's gate and up rows, their set
difference against utility, and Chen et al.'s activation contrast (`contrast.py`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from safeneurons.masks.neurons import neuron_scores, top_fraction
from safeneurons.runtime import distributed

if TYPE_CHECKING:
    from safeneurons.scores.config import ScoreConfig

WEIGHT_METHODS = ("wandg", "wanda")


def weight_ranking(model: nn.Module, tokenizer: Any, config: ScoreConfig) -> dict[int, torch.Tensor]:
    """Collective: each MLP neuron's score (`config.method` on `config.data`; its sparsity ratio plays no part);
    every rank gets every layer. Ranks score different layers, so each sends only its rows' sums (a number per
    row, not the whole matrices)."""
    from dataclasses import replace

    from safeneurons.scores.schedules import score_model

    scores = score_model(model, tokenizer, replace(config, keep_scores=True)).scores
    row_sums = {name: value.float().sum(1, keepdim=True) for name, value in scores.items() if ".mlp." in name}
    merged: dict[str, torch.Tensor] = {}
    for part in distributed.all_gather(row_sums):
        merged.update(part)
    return neuron_scores(merged, model.config)


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
