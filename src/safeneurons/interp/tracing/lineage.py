"""The lineage test: match neurons layer by layer, Spearman per layer, Fisher's combined p-value."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from scipy import stats
from torch import nn

from safeneurons.errors import SafeneuronsError
from safeneurons.interp.tracing.activations import as_batches, collect_mlp_activations
from safeneurons.interp.tracing.assignment import DEFAULT_ALPHA, KINDS, NEG_LOG10_CAP, match_wmats, resolve_solver
from safeneurons.models.structure import decoder_layers, model_device

if TYPE_CHECKING:
    from safeneurons.interp.tracing.activations import MlpActivations
    from safeneurons.interp.tracing.assignment import TokenInputs


@dataclass(frozen=True)
class LayerMatch:
    """Spearman's test between the gate and up neuron assignments of `layer_base` (base) and `layer_other`."""

    layer_base: int
    layer_other: int
    pvalue: float
    spearman_rho: float
    n_matched: int  # neurons of the narrower layer, each matched into the wider one
    seconds: float


def match_neurons(acts_a: np.ndarray, acts_b: np.ndarray, solver: str = "auto",
                  device: str | torch.device = "cpu") -> np.ndarray:
    """Assignment between the neurons (columns) of two [tokens, neurons] activation matrices: the narrower side's
    neurons are matched into the wider side's, and for each of them the partner's index is returned."""
    if acts_a.shape[1] > acts_b.shape[1]:
        acts_a, acts_b = acts_b, acts_a
    return match_wmats(torch.from_numpy(np.asarray(acts_a)).T, torch.from_numpy(np.asarray(acts_b)).T,
                       solver, device=device)


def spearman_test(perm_gate: np.ndarray, perm_up: np.ndarray) -> tuple[float, float]:
    """(rho, p-value) of Spearman's test between the two permutations."""
    if len(perm_gate) < 3:
        raise SafeneuronsError(f"only {len(perm_gate)} neurons to match; Spearman's test needs at least 3")
    result = stats.spearmanr(perm_gate, perm_up)
    return float(result.statistic), float(result.pvalue)


def match_layer(base: MlpActivations, other: MlpActivations, layer_base: int, layer_other: int,
                solver: str = "auto", device: str | torch.device = "cpu") -> LayerMatch:
    started = time.perf_counter()
    perms = {kind: match_neurons(base.get(kind, layer_base), other.get(kind, layer_other), solver, device)
             for kind in KINDS}
    rho, pvalue = spearman_test(perms["gate"], perms["up"])
    return LayerMatch(layer_base, layer_other, pvalue, rho, len(perms["gate"]), time.perf_counter() - started)


def fisher_pvalue(pvalues: Sequence[float]) -> float:
    """Fisher's method: -2 Σ log p_i ~ χ²(2L) under independence (a p-value of 0 gives 0)."""
    with np.errstate(divide="ignore"):
        return float(stats.combine_pvalues(np.asarray(pvalues, dtype=np.float64), method="fisher").pvalue)


def neg_log10(pvalue: float) -> float:
    return NEG_LOG10_CAP if pvalue <= 0 else -math.log10(pvalue)


def layer_pairs(n_base: int, n_other: int, all_layers: bool) -> list[tuple[int, int]]:
    """Layer i with layer i, or with `all_layers` every (base layer, other layer) pair."""
    if all_layers:
        return [(i, j) for i in range(n_base) for j in range(n_other)]
    if n_base != n_other:
        raise SafeneuronsError(f"the base model has {n_base} layers and the other {n_other}: layer-by-layer matching "
                               f"needs the same depth; use --all-layers (statistic_all) to match every pair of layers")
    return [(i, i) for i in range(n_base)]


@dataclass
class TraceResult:
    """The test's outcome. `aligned` mode: layer i against layer i, aggregated with Fisher's method. `all-layers`
    mode: every pair, aggregated as the Bonferroni-adjusted smallest p-value (a pair is significant when
    p < alpha / pairs); `best_matches` gives each layer of the other model its best base layer."""

    mode: str
    layers: list[LayerMatch]
    aggregate_pvalue: float
    aggregate_method: str
    alpha: float
    n_tokens: int
    solver: str
    best_matches: list[dict[str, Any]] = field(default_factory=list)
    significant_pairs: list[tuple[int, int]] = field(default_factory=list)

    @property
    def dependent(self) -> bool:
        return self.aggregate_pvalue < self.alpha

    @property
    def verdict(self) -> str:
        return "dependent" if self.dependent else "independent"

    @property
    def pvalues(self) -> list[float]:
        return [match.pvalue for match in self.layers]

    @property
    def matched_pairs(self) -> list[tuple[int, int]]:
        """(base layer, other layer) for each other layer whose best base layer is significant."""
        significant = set(self.significant_pairs)
        pairs = [(best["layer_base"], best["layer_other"]) for best in self.best_matches]
        return [pair for pair in pairs if pair in significant]

    def to_json(self) -> dict[str, Any]:
        payload = {"mode": self.mode, "verdict": self.verdict, "alpha": self.alpha,
                   "aggregate_pvalue": self.aggregate_pvalue, "aggregate_method": self.aggregate_method,
                   "solver": self.solver, "n_tokens": self.n_tokens,
                   "layers": [{**asdict(match), "neg_log10_p": neg_log10(match.pvalue)} for match in self.layers]}
        if self.mode == "aligned":
            payload["fisher_pvalue"] = self.aggregate_pvalue
        else:
            payload.update(best_matches=self.best_matches, matched_pairs=self.matched_pairs,
                           significant_pairs=self.significant_pairs)
        return payload


def summarize(matches: Sequence[LayerMatch], all_layers: bool, alpha: float, n_tokens: int, solver: str) -> TraceResult:
    matches = sorted(matches, key=lambda match: (match.layer_base, match.layer_other))
    if not all_layers:
        return TraceResult("aligned", matches, fisher_pvalue([m.pvalue for m in matches]), "fisher", alpha,
                           n_tokens, solver)
    threshold = alpha / len(matches)
    best_matches = []
    for layer_other in sorted({match.layer_other for match in matches}):
        best = min((m for m in matches if m.layer_other == layer_other), key=lambda m: (m.pvalue, -m.spearman_rho))
        best_matches.append({"layer_other": layer_other, "layer_base": best.layer_base, "pvalue": best.pvalue})
    significant = [(m.layer_base, m.layer_other) for m in matches if m.pvalue < threshold]
    aggregate = min(1.0, len(matches) * min(m.pvalue for m in matches))
    return TraceResult("all-layers", matches, aggregate, "bonferroni-min", alpha, n_tokens, solver,
                       best_matches, significant)


def trace_models(base_model: nn.Module, other_model: nn.Module, inputs: TokenInputs, *, all_layers: bool = False,
                 solver: str = "auto", alpha: float = DEFAULT_ALPHA, memory_limit: float | None = None,
                 spill_dir: str | Path | None = None) -> TraceResult:
    """The whole test in one process: one pass per model over `inputs` (every layer's gate and up outputs), then
    an assignment per layer (pair) and kind, Spearman per layer (pair), and the aggregate."""
    pairs = layer_pairs(len(decoder_layers(base_model)), len(decoder_layers(other_model)), all_layers)
    batches = as_batches(inputs)
    base = collect_mlp_activations(base_model, batches, {i for i, _ in pairs}, memory_limit=memory_limit,
                                   spill_dir=spill_dir)
    other = collect_mlp_activations(other_model, batches, {j for _, j in pairs}, memory_limit=memory_limit,
                                    spill_dir=spill_dir)
    device = model_device(base_model)
    matches = [match_layer(base, other, i, j, solver, device) for i, j in pairs]
    return summarize(matches, all_layers, alpha, base.n_tokens, resolve_solver(solver))
