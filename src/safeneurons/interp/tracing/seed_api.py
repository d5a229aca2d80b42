"""The seed's tracing API (statistic, mlp_matching_gate, …) on top of the lineage test."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from safeneurons.errors import SafeneuronsError
from safeneurons.interp.tracing.activations import as_batches, collect_mlp_activations
from safeneurons.interp.tracing.assignment import DEFAULT_ALPHA, match_wmats
from safeneurons.interp.tracing.lineage import layer_pairs, match_layer, trace_models
from safeneurons.models.structure import decoder_layers, model_device

if TYPE_CHECKING:
    from safeneurons.interp.tracing.assignment import TokenInputs
    from safeneurons.interp.tracing.lineage import TraceResult


def _matching(kind: str, base_model: nn.Module, ft_model: nn.Module, inputs: TokenInputs, i: int, j: int | None,
              solver: str) -> np.ndarray:
    batches = as_batches(inputs)
    j = i if j is None else j
    base = collect_mlp_activations(base_model, batches, [i], kinds=[kind]).get(kind, i)
    other = collect_mlp_activations(ft_model, batches, [j], kinds=[kind]).get(kind, j)
    return match_wmats(torch.from_numpy(base).T, torch.from_numpy(other).T, solver, device=model_device(base_model))


def mlp_matching_gate(base_model: nn.Module, ft_model: nn.Module, inputs: TokenInputs, i: int = 0,
                      j: int | None = None, solver: str = "auto") -> np.ndarray:
    """Assignment of layer `i`'s gate neurons of `base_model` to layer `j`'s (default `i`) of `ft_model` on the
    gate outputs: `perm` with ft neuron `perm[k]` matched to base neuron k (as `match_wmats`)."""
    return _matching("gate", base_model, ft_model, inputs, i, j, solver)


def mlp_matching_up(base_model: nn.Module, ft_model: nn.Module, inputs: TokenInputs, i: int = 0,
                    j: int | None = None, solver: str = "auto") -> np.ndarray:
    """As `mlp_matching_gate`, on the up-projection outputs."""
    return _matching("up", base_model, ft_model, inputs, i, j, solver)


def mlp_layers(base_model: nn.Module, ft_model: nn.Module, inputs: TokenInputs, i: int, j: int,
               solver: str = "auto") -> float:
    """p-value of layer `i` of `base_model` against layer `j` of `ft_model` (one pass per model)."""
    batches = as_batches(inputs)
    base = collect_mlp_activations(base_model, batches, [i])
    other = collect_mlp_activations(ft_model, batches, [j])
    return match_layer(base, other, i, j, solver, model_device(base_model)).pvalue


def statistic_layer(base_model: nn.Module, ft_model: nn.Module, inputs: TokenInputs, i: int = 0,
                    solver: str = "auto") -> float:
    """p-value of layer `i` of both models."""
    return mlp_layers(base_model, ft_model, inputs, i, i, solver)


def statistic(base_model: nn.Module, ft_model: nn.Module, inputs: TokenInputs, n_blocks: int | None = None,
              solver: str = "auto") -> list[float]:
    """Per-layer p-values, layer i against layer i, for the first `n_blocks` layers (default: every layer;
    aggregate them with `fisher_pvalue`, or call `trace_models` for the whole result)."""
    n_layers = len(layer_pairs(len(decoder_layers(base_model)), len(decoder_layers(ft_model)), all_layers=False))
    if n_blocks is None:
        n_blocks = n_layers
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or not 1 <= n_blocks <= n_layers:
        raise SafeneuronsError(f"n_blocks={n_blocks!r}: the models have {n_layers} layers; pass 1 to "
                               f"{n_layers}, or leave it out for every layer")
    batches = as_batches(inputs)
    base = collect_mlp_activations(base_model, batches, range(n_blocks))
    other = collect_mlp_activations(ft_model, batches, range(n_blocks))
    return [match_layer(base, other, i, i, solver, model_device(base_model)).pvalue for i in range(n_blocks)]


def statistic_all(model_1: nn.Module, model_2: nn.Module, inputs: TokenInputs, solver: str = "auto",
                  alpha: float = DEFAULT_ALPHA) -> TraceResult:
    """Every layer of `model_1` against every layer of `model_2`; `.best_matches` and `.matched_pairs` tell which
    layers correspond (for pruned or deeper models)."""
    return trace_models(model_1, model_2, inputs, all_layers=True, solver=solver, alpha=alpha)
