"""Circuits chosen from edge scores, and how much of the behaviour they keep (MIB, Mueller et al. 2025).

A circuit of n edges is the n edges of highest |score| (or the greedy search's n), reduced to those on a path
from the input to the logits (the others change nothing). Its faithfulness is (m_circuit − m_empty) / (m_clean −
m_empty): every edge outside it reads its node's corrupted output; m_empty is the circuit of no edge (its logits
read the corrupted run's final residual, so it is the corrupted run's metric up to rounding) and m_clean the
circuit of every edge. Metrics are averaged over the pairs before the ratio. The curve runs over circuit sizes from 0.1%
to 100% of the edges; CPR is its area and CMD the area of |1 − faithfulness| (trapezoids over the fraction of edges,
MIB's two scores: CPR high and CMD low is faithful). Random circuits of the same sizes are the control band.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from safeneurons.interp.circuits.graph import CircuitGraph

FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # MIB's circuit sizes
KEEP = 0.8  # "how many edges keep 80% of the metric"


def circuit_sizes(n_edges: int, fractions: Sequence[float] = FRACTIONS) -> list[int]:
    """The number of edges at each fraction (at least one)."""
    return [max(1, round(fraction * n_edges)) for fraction in fractions]


def top_circuit(graph: CircuitGraph, scores: torch.Tensor, size: int) -> torch.Tensor:
    """[receivers, nodes] the `size` edges of highest |score|, on paths from the input to the logits."""
    adjacency = graph.adjacency()
    magnitude = torch.where(adjacency, scores.abs().float(), -1.0).flatten()
    kept = torch.zeros(magnitude.numel(), dtype=torch.bool)
    kept[torch.argsort(magnitude, descending=True, stable=True)[:size]] = True
    return graph.on_paths(kept.reshape(adjacency.shape))


def random_circuit(graph: CircuitGraph, size: int, seed: int) -> torch.Tensor:
    """`size` edges drawn uniformly (torch.Generator seeded with `seed`), on paths from the input to the logits."""
    adjacency = graph.adjacency()
    edges = adjacency.flatten().nonzero()[:, 0]
    chosen = edges[torch.randperm(edges.numel(), generator=torch.Generator().manual_seed(seed))[:size]]
    kept = torch.zeros(adjacency.numel(), dtype=torch.bool)
    kept[chosen] = True
    return graph.on_paths(kept.reshape(adjacency.shape))


def faithfulness(value: float, clean: float, empty: float) -> float:
    return (value - empty) / (clean - empty) if clean != empty else float("nan")


def area(fractions: Sequence[float], values: Sequence[float]) -> float:
    """The trapezoid area under `values` over `fractions`, divided by the fractions' span (1 for a constant 1)."""
    x, y = torch.tensor(fractions, dtype=torch.float64), torch.tensor(values, dtype=torch.float64)
    return float(torch.trapezoid(y, x) / (x[-1] - x[0]))


@dataclass
class FaithfulnessCurve:
    """One ranking's circuits at every size: the edges asked, the edges on paths and the faithfulness."""

    name: str
    fractions: list[float]
    sizes: list[int]  # edges asked for
    kept: list[int]  # of them on paths from the input to the logits
    values: list[float]  # faithfulness
    metrics: list[float] = field(default_factory=list)  # the mean metric of each circuit

    @property
    def cpr(self) -> float:
        return area(self.fractions, self.values)

    @property
    def cmd(self) -> float:
        return area(self.fractions, [abs(1 - value) for value in self.values])

    def edges_to_keep(self, share: float = KEEP) -> int | None:
        """The smallest circuit (edges on paths) whose faithfulness reaches `share`; None if none does."""
        return next((kept for kept, value in zip(self.kept, self.values) if value >= share), None)

    def to_dict(self) -> dict:
        return {"name": self.name, "fractions": self.fractions, "edges_asked": self.sizes, "edges": self.kept,
                "faithfulness": self.values, "metric": self.metrics, "cpr": self.cpr, "cmd": self.cmd,
                f"edges_for_{round(KEEP * 100)}pct": self.edges_to_keep()}


def random_band(curves: Sequence[FaithfulnessCurve]) -> dict[str, list[float]]:
    """Per size, the random circuits' mean, minimum and maximum faithfulness."""
    columns = list(zip(*(curve.values for curve in curves)))
    return {"mean": [sum(column) / len(column) for column in columns], "min": [min(column) for column in columns],
            "max": [max(column) for column in columns]}
