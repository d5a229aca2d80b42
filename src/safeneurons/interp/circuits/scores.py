"""Edge scores of one clean/corrupted pair: EAP, EAP-IG and exact edge patching, and the metric of circuits.

EAP (Syed et al. 2023): score(u → v) = Σ_tokens (a_u(corrupted) − a_u(clean)) · ∂metric/∂(input of v), the
gradient on the clean run: one clean forward and backward and one corrupted forward. EAP-IG (Hanna et al. 2024):
the gradient averaged over `steps` runs whose input embeddings go from the corrupted prompt's towards the clean
one's (k/steps of the way, k = 1 … steps; one step is EAP), all in one batch. Exact: the metric with edge u → v
alone patched (only v's input sees u's corrupted output), minus the clean metric. Each is an estimate or the value
of m(patched) − m(clean); scores are [receivers, nodes], zero where there is no edge.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from safeneurons.interp.circuits.forward import EdgePatch, NodeOutputs, align_rows, node_differences, record_nodes
from safeneurons.interp.circuits.pairs import PairAlignment, align_pair
from safeneurons.interp.patching.hooks import patched_forward

if TYPE_CHECKING:
    from safeneurons.interp.circuits.graph import CircuitGraph
    from safeneurons.interp.patching.metrics import Metric


@dataclass
class PreparedPair:
    """A pair's clean run and its corrupted run's node outputs at the clean positions."""

    index: int
    clean_ids: torch.Tensor  # [1, T]
    alignment: PairAlignment
    clean: NodeOutputs
    corrupted: NodeOutputs  # aligned to the clean positions
    corrupted_embeddings: torch.Tensor | None  # [1, T, D] the corrupted input embeddings at the clean positions
    clean_metric: float | None  # (on a layer-sharded model, the embeddings are the first stage's and the
    corrupted_metric: float | None  # metrics the last stage's); the corrupted prompt's own run (its own length)


def prepare_pair(model: nn.Module, metric: Metric, index: int, clean_ids: torch.Tensor,
                 corrupted_ids: torch.Tensor, alignment: str) -> PreparedPair:
    aligned = align_pair(clean_ids[0].tolist(), corrupted_ids[0].tolist(), alignment, index)
    clean, clean_out = record_nodes(model, clean_ids)
    corrupted, corrupted_out = record_nodes(model, corrupted_ids)
    return PreparedPair(index, clean_ids, aligned, clean, corrupted.aligned(aligned.matrix()),
                        aligned_embeddings(model, corrupted_ids, aligned),
                        float(metric.compute(clean_out.logits, clean_out.residual)[0]),
                        float(metric.compute(corrupted_out.logits, corrupted_out.residual)[0]))


def aligned_embeddings(model: nn.Module, ids: torch.Tensor, alignment: PairAlignment) -> torch.Tensor:
    """[1, T, D] the input embeddings of `ids` (the corrupted prompt) at the clean prompt's positions."""
    with torch.no_grad():
        return align_rows(alignment.matrix(), model.get_input_embeddings()(ids)[0])[None]


def interpolated(clean: torch.Tensor, corrupted: torch.Tensor, steps: int) -> torch.Tensor:
    """EAP-IG's inputs: [steps, T, D] k/steps of the way from the `corrupted` embeddings to the `clean` ones,
    k = 1 … steps; the clean embeddings themselves when `steps` is 0 (EAP)."""
    if not steps:
        return clean
    fractions = torch.arange(1, steps + 1, dtype=clean.dtype, device=clean.device)[:, None, None] / steps
    return corrupted + fractions * (clean - corrupted)


def receiver_gradients(model: nn.Module, graph: CircuitGraph, metric: Metric, pair: PreparedPair,
                       steps: int) -> torch.Tensor:
    """[receivers, T, D] ∂metric/∂(receiver input): on the clean run (steps 0), or averaged over `steps` runs
    interpolating the input embeddings from the corrupted prompt's to the clean one's."""
    with torch.no_grad():
        rows = interpolated(model.get_input_embeddings()(pair.clean_ids), pair.corrupted_embeddings, steps)
    with torch.enable_grad(), EdgePatch(model, graph, probing=True) as hooks:
        out = patched_forward(model, {}, inputs_embeds=rows)
        value = metric.compute(out.logits, out.residual).sum()
        gradients = torch.autograd.grad(value, hooks.gradients(), allow_unused=True)
    return hooks.mean_gradients(gradients, rows.shape[0])


def receiver_blocks(graph: CircuitGraph, layers: range | None = None,
                    logits: bool = True) -> list[tuple[int, int, int]]:
    """(first receiver, count, nodes read) of each block of receivers that read the same nodes: a layer's
    attention receivers, its MLP, the logits."""
    blocks = []
    for layer in range(graph.n_layers) if layers is None else layers:
        blocks += [(graph.attention_receiver(layer), graph.attention_receivers, graph.nodes_before_attention(layer)),
                   (graph.mlp_receiver(layer), 1, graph.nodes_before_mlp(layer))]
    return blocks + ([(graph.logits_receiver, 1, graph.n_nodes)] if logits else [])


def score_rows(gradients: torch.Tensor, differences: torch.Tensor,
               blocks: Sequence[tuple[int, int, int]]) -> dict[int, torch.Tensor]:
    """Receiver -> its row of scores over the nodes it reads, block by block (the same products whether the
    receivers are all here or a stage's): `gradients` [the blocks' receivers, T, D], `differences` [nodes, T, D]."""
    rows: dict[int, torch.Tensor] = {}
    start = 0
    for first, count, upstream in blocks:
        block = gradients[start:start + count].float().flatten(1) @ differences[:upstream].float().flatten(1).T
        rows.update({first + index: block[index] for index in range(count)})
        start += count
    return rows


def attribution_scores(model: nn.Module, graph: CircuitGraph, metric: Metric, pair: PreparedPair,
                       steps: int) -> torch.Tensor:
    """[receivers, nodes] EAP (steps 0) or EAP-IG scores of every edge, float32."""
    gradients = receiver_gradients(model, graph, metric, pair, steps)
    with torch.no_grad():
        differences = node_differences(model, graph, pair.clean, pair.corrupted)
    return score_matrix(graph, score_rows(gradients, differences, receiver_blocks(graph)))


def score_matrix(graph: CircuitGraph, rows: dict[int, torch.Tensor]) -> torch.Tensor:
    """[receivers, nodes] from every receiver's row (zero where there is no edge)."""
    scores = torch.zeros(graph.n_receivers, graph.n_nodes)
    for receiver, row in rows.items():
        scores[receiver, :row.numel()] = row
    return scores


def circuit_metrics(model: nn.Module, graph: CircuitGraph, metric: Metric, pair: PreparedPair,
                    circuits: Sequence[torch.Tensor], batch_size: int, scale: float = 1.0) -> list[float]:
    """The metric of each circuit ([receivers, nodes] bool, the edges kept): every edge outside it reads its node's
    corrupted output (scaled: clean + scale · (corrupted − clean)). Rows of a batch are circuits."""
    corrupted = pair.clean.toward(pair.corrupted, scale)
    adjacency = graph.adjacency()
    values: list[float] = []
    for start in range(0, len(circuits), batch_size):
        kept = torch.stack(list(circuits[start:start + batch_size]))
        excluded = (adjacency & ~kept).to(pair.clean_ids.device)
        with torch.no_grad(), EdgePatch(model, graph, corrupted, excluded):
            out = patched_forward(model, {}, pair.clean_ids.expand(kept.shape[0], -1))
            values += metric.compute(out.logits, out.residual).tolist()
    return values


def exact_edge_effects(model: nn.Module, graph: CircuitGraph, metric: Metric, pair: PreparedPair,
                       edges: Sequence[tuple[int, int]], batch_size: int, scale: float = 1.0) -> list[float]:
    """m(edge u → v alone patched) − m(clean) of each (receiver, node) edge."""
    patched = circuit_metrics(model, graph, metric, pair, all_but(graph, edges), batch_size, scale)
    return [value - pair.clean_metric for value in patched]


def all_but(graph: CircuitGraph, edges: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Per (receiver, node) edge, the circuit of every other edge: exact patching of that edge alone."""
    adjacency = graph.adjacency()
    circuits = []
    for receiver, node in edges:
        kept = adjacency.clone()
        kept[receiver, node] = False
        circuits.append(kept)
    return circuits
