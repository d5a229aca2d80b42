"""The circuit study's result: faithfulness curves with the random band, how EAP and EAP-IG agree with exact edge
patching, the circuit chosen, and its overlap with the safety-critical weights."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from safeneurons.interp.circuits.faithfulness import KEEP, FaithfulnessCurve, circuit_sizes, faithfulness, random_band
from safeneurons.interp.circuits.overlap import mask_share

if TYPE_CHECKING:
    from safeneurons.interp.circuits.graph import CircuitGraph
    from safeneurons.interp.circuits.run import CircuitConfig


@dataclass
class PairValues:
    """What one pair's scoring gives: [receivers, nodes] EAP and EAP-IG scores, the clean metric, the corrupted
    prompt's own and the metric with every edge corrupted."""

    eap: torch.Tensor
    eap_ig: torch.Tensor
    clean: float
    corrupted: float
    empty: float


def pair_mean(values: Sequence[torch.Tensor | float | list[float]]) -> Any:
    """The mean over pairs, summed in pair order (the same bits on any number of ranks)."""
    if isinstance(values[0], list):
        return [pair_mean([value[index] for value in values]) for index in range(len(values[0]))]
    total = values[0]
    for value in values[1:]:
        total = total + value
    return total / len(values)


@dataclass
class CircuitResult:
    model: str
    graph: dict[str, int]
    settings: dict[str, Any]
    alignments: list[dict[str, int]]  # each pair's (pairs.PairAlignment.to_dict)
    metrics: dict[str, float]  # mean clean, corrupted (its own run) and empty-circuit metric over the pairs
    curves: dict[str, FaithfulnessCurve]
    random: list[FaithfulnessCurve]
    edge_names: list[str]
    eap: list[float]
    eap_ig: list[float]
    exact: dict[str, float]  # edge name -> exact effect (where patched)
    agreement: dict[str, float | None]
    circuit: dict[str, Any]  # the circuit chosen: its edges, nodes and faithfulness
    masks: dict[str, float] | None = None
    nodes: list[str] = field(default_factory=list)
    removal: dict[str, Any] | None = None  # removal.removal_study

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "graph": self.graph, "settings": self.settings, "alignments": self.alignments,
                "metrics": self.metrics, "curves": {name: curve.to_dict() for name, curve in self.curves.items()},
                "random": {"curves": [curve.to_dict() for curve in self.random],
                           "band": random_band(self.random)},
                "edges": {"names": self.edge_names, "eap": self.eap, "eap_ig": self.eap_ig, "exact": self.exact},
                "agreement": self.agreement, "circuit": self.circuit, "mask_overlap": self.masks,
                "nodes": self.nodes, "removal": self.removal}


def spearman(first: Sequence[float], second: Sequence[float]) -> float | None:
    from scipy.stats import spearmanr

    if len(first) < 3:
        return None
    value = float(spearmanr(first, second).statistic)
    return None if math.isnan(value) else value


def top_overlap(estimate: Sequence[float], exact: Sequence[float], k: int) -> float | None:
    """|top-k by |estimate| ∩ top-k by |exact|| / k."""
    if not exact:
        return None
    def top(values: Sequence[float]) -> set[int]:
        return set(torch.argsort(torch.tensor(values).abs(), descending=True, stable=True)[:k].tolist())
    return len(top(estimate) & top(exact)) / k


def agreement(eap: Sequence[float], eap_ig: Sequence[float], exact: Sequence[float]) -> dict[str, float | None]:
    """Rank correlations and top-k overlaps (k = a fifth of the exactly patched edges) with the exact effects."""
    k = max(1, len(exact) // 5)
    return {"edges_exact": len(exact), "overlap_k": k,
            "spearman_eap_exact": spearman(eap, exact), "spearman_eap_ig_exact": spearman(eap_ig, exact),
            f"top{k}_overlap_eap": top_overlap(eap, exact, k), f"top{k}_overlap_eap_ig": top_overlap(eap_ig, exact, k)}


def curve(name: str, masks: torch.Tensor, metrics: Sequence[float], fractions: Sequence[float] | None,
          sizes: Sequence[int] | None, clean: float, empty: float, n_edges: int) -> FaithfulnessCurve:
    kept = [int(mask.sum()) for mask in masks]
    return FaithfulnessCurve(name, list(fractions) if fractions else [count / n_edges for count in kept],
                             list(sizes) if sizes else kept, kept,
                             [faithfulness(value, clean, empty) for value in metrics], list(metrics))


def summarize(graph: CircuitGraph, config: CircuitConfig, pairs: Sequence[PairValues], eap: torch.Tensor,
              eap_ig: torch.Tensor, circuits: Mapping[str, torch.Tensor], measured: Sequence[float],
              edges: Sequence[tuple[int, int]], exact: Sequence[float], model: str,
              masks: Mapping[str, torch.Tensor] | None = None) -> CircuitResult:
    clean = pair_mean([pair.clean for pair in pairs])
    empty = pair_mean([pair.empty for pair in pairs])
    sizes = circuit_sizes(graph.n_edges, config.fractions)
    values: dict[str, list[float]] = {}
    start = 0
    for name, stack in circuits.items():
        values[name] = list(measured[start:start + len(stack)])
        start += len(stack)
    curves = {name: curve(name, circuits[name], values[name], config.fractions, sizes, clean, empty, graph.n_edges)
              for name in ("eap-ig", "eap")}
    curves["nodes"] = curve("nodes", circuits["nodes"], values["nodes"], None, None, clean, empty, graph.n_edges)
    randoms = [curve(f"random{seed}", circuits["random"][seed * len(sizes):(seed + 1) * len(sizes)],
                     values["random"][seed * len(sizes):(seed + 1) * len(sizes)], config.fractions, sizes, clean,
                     empty, graph.n_edges) for seed in range(config.random_seeds)]
    adjacency = graph.adjacency()
    names = graph.edge_names()
    index = {tuple(edge): position for position, edge in enumerate(adjacency.nonzero().tolist())}
    exact_by_name = {names[index[edge]]: value for edge, value in zip(edges, exact)}
    chosen_mask, chosen_value = chosen_circuit(curves[config.ranking], circuits, values, config)
    nodes, node_names = chosen_nodes(chosen_mask), graph.node_names()
    ranking = config.ranked(eap, eap_ig)
    circuit = {"size": int(chosen_mask.sum()), "faithfulness": faithfulness(chosen_value, clean, empty),
               "selection": config.selection, "ranking": config.ranking,
               "edges": [{"edge": names[index[(r, u)]], "score": float(ranking[r, u])}
                         for r, u in chosen_mask.nonzero().tolist()],
               "nodes": [node_names[node] for node in nodes.nonzero()[:, 0].tolist()]}
    return CircuitResult(
        model, {"nodes": graph.n_nodes, "receivers": graph.n_receivers, "edges": graph.n_edges,
                "layers": graph.n_layers, "heads": graph.n_heads, "kv_heads": graph.n_kv_heads},
        asdict(config), [],
        {"clean": clean, "corrupted": pair_mean([pair.corrupted for pair in pairs]), "empty": empty},
        curves, randoms, names, eap[adjacency].tolist(), eap_ig[adjacency].tolist(), exact_by_name,
        agreement([float(eap[edge]) for edge in edges], [float(eap_ig[edge]) for edge in edges], list(exact)),
        circuit, None if masks is None else mask_share(masks, graph, nodes), node_names)


def chosen_circuit(ranked: FaithfulnessCurve, circuits: Mapping[str, torch.Tensor],
                   values: Mapping[str, list[float]], config: CircuitConfig) -> tuple[torch.Tensor, float]:
    """The circuit of `--circuit-size` edges, else the ranking's smallest keeping 80% of the metric (its most
    faithful when none does)."""
    if "chosen" in circuits:
        return circuits["chosen"][0], values["chosen"][0]
    reaching = [i for i, value in enumerate(ranked.values) if value >= KEEP]
    best = reaching[0] if reaching else max(range(len(ranked.values)), key=lambda i: ranked.values[i])
    return circuits[config.ranking][best], values[config.ranking][best]


def chosen_nodes(kept: torch.Tensor) -> torch.Tensor:
    """[nodes] the heads and MLPs with an edge out of them in the circuit (on input-to-logits paths, every node
    the circuit reads through also writes into it)."""
    nodes = kept.any(0)
    nodes[0] = False
    return nodes
