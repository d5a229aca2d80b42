"""The original extension's API: find the safety-critical weights of a loaded model and freeze them."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from safeneurons.errors import SafeneuronsError
from safeneurons.models.structure import scored_linears
from safeneurons.runtime import distributed
from safeneurons.scores.config import ScoreConfig
from safeneurons.scores.schedules import score_model


class SafetyNeuronAnalyzer:
    """The original extension's API: find the safety-critical weights of a loaded model."""

    def __init__(self, model: nn.Module, tokenizer: Any, data_dir: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.data_dir = data_dir
        self.safety_masks: dict[str, torch.Tensor] | None = None
        self.summary: dict[str, Any] | None = None
        self.last_settings: dict[str, Any] | None = None  # for re-scoring a fine-tuned model the same way
        self.original_weights: dict[str, torch.Tensor] | None = None

    def identify_safety_critical_neurons(self, prune_method: str = "wandg", prune_data: str = "align",
                                         sparsity_ratio: float = 0.1, nsamples: int = 128,
                                         seed: int = 0) -> dict[str, torch.Tensor]:
        """All masks (bool, 1 = safety-critical), named like the parameters, on every rank."""
        self.last_settings = dict(prune_method=prune_method, prune_data=prune_data, sparsity_ratio=sparsity_ratio,
                                  nsamples=nsamples, seed=seed)
        config = ScoreConfig(method=prune_method, data=prune_data, sparsity_ratio=sparsity_ratio,
                             nsamples=nsamples, seed=seed, data_dir=self.data_dir)
        result = score_model(self.model, self.tokenizer, config)
        masks: dict[str, torch.Tensor] = {}
        for part in distributed.all_gather(result.masks):  # convenience API: the whole mask set on each rank
            masks.update(part)
        self.safety_masks, self.summary = masks, result.summary
        return masks

    def freeze_safety_critical_neurons(self, model: nn.Module | None = None) -> nn.Module:
        """`model` (default: the analysed one) with its safety-critical weights frozen: the `FrozenWeights` is
        attached as `model.safeneurons_frozen`, which `FineTuner(model, tokenizer)` picks up, so the masked
        elements stay bit-identical through its fine-tuning."""
        if self.safety_masks is None:
            raise SafeneuronsError("call identify_safety_critical_neurons before freezing")
        from safeneurons.interventions.freezing import FROZEN_ATTRIBUTE, freeze

        model = self.model if model is None else model
        setattr(model, FROZEN_ATTRIBUTE, freeze(model, self.safety_masks))
        return model

    def _store_original_weights(self, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Copies of the scored weights of `model` (default: the analysed one), for `_extract_safety_masks`
        (single process: under ZeRO-3 a rank holds partitions only)."""
        model = self.model if model is None else model
        self.original_weights = {linear.param_name: linear.weight.detach().clone()
                                 for linear in scored_linears(model)}
        return self.original_weights

    def _extract_safety_masks(self, pruned_model: nn.Module) -> dict[str, torch.Tensor]:
        """The original extension's masks of a pruned copy: the weights that are zero in `pruned_model` but were
        not in the stored originals."""
        if self.original_weights is None:
            raise SafeneuronsError("call _store_original_weights before _extract_safety_masks")
        current = {linear.param_name: linear.weight.detach() for linear in scored_linears(pruned_model)}
        if current.keys() != self.original_weights.keys():
            raise SafeneuronsError("the pruned model's scored weights are not those of the stored model")
        return {name: (current[name] == 0) & (original != 0) for name, original in self.original_weights.items()}
