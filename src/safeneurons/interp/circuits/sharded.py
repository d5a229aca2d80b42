"""`circuit --shard layers`: each stage holds its own layers' nodes and receivers.

Per pair, on the stages of one pipeline: the clean and the corrupted prompt flow through once each, every stage
keeping its own nodes' outputs. EAP and EAP-IG: one pipelined forward with probes on each stage's receivers and
one pipelined backward (the hidden states' gradient passed back); the nodes' corrupted − clean differences travel
up the pipeline, each stage appending its own, so that a stage scores its receivers against every node below
them. Circuits and exact edges: one pipelined forward per batch of rows, each stage sending the hidden states and
the rows' differences of the nodes below the next stage (nodes × tokens × hidden per row: the bound on what
travels). The last stage computes the metric. Pipelines (replicas) split the pairs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from safeneurons.interp.circuits.analysis import PairValues
from safeneurons.interp.circuits.forward import EdgePatch, node_differences, node_keepers, node_outputs
from safeneurons.interp.circuits.pairs import align_pair
from safeneurons.interp.circuits.scores import (PreparedPair, aligned_embeddings, all_but, interpolated,
                                                receiver_blocks, score_matrix, score_rows)
from safeneurons.interp.patching.hooks import keep_final_residual
from safeneurons.interp.patching.sharded import _stage_pass
from safeneurons.models.blocks import block_of
from safeneurons.runtime import distributed

if TYPE_CHECKING:
    from safeneurons.interp.circuits.forward import NodeOutputs
    from safeneurons.interp.circuits.graph import CircuitGraph
    from safeneurons.interp.circuits.run import CircuitConfig
    from safeneurons.interp.patching.metrics import Metric
    from safeneurons.models.blocks import LayerBlock
    from safeneurons.runtime.pipeline import StageLink


def stage_nodes(block: LayerBlock, link: StageLink, graph: CircuitGraph, metric: Metric,
                ids: torch.Tensor) -> tuple[NodeOutputs, float | None]:
    """This stage's nodes' outputs in a plain pass of one prompt, and the metric on the last stage."""
    cache: dict[tuple[int, str], torch.Tensor] = {}
    out = _stage_pass(block, link, node_keepers(cache, block.layers), ids)
    return node_outputs(cache, graph.n_layers), None if out is None else float(metric.compute(out.logits,
                                                                                              out.residual)[0])


def stage_recorder(model: nn.Module, graph: CircuitGraph,
                   metric: Metric) -> Callable[[torch.Tensor], NodeOutputs] | None:
    """A prompt's node outputs on this stage (collective over its pipeline); None for a whole model."""
    block = block_of(model)
    if block is None:
        return None

    def record(ids: torch.Tensor) -> NodeOutputs:
        link = block.link()
        try:
            return stage_nodes(block, link, graph, metric, ids)[0]
        finally:
            link.finish()
    return record


def stage_pair(block: LayerBlock, link: StageLink, graph: CircuitGraph, metric: Metric, clean: torch.Tensor,
               corrupted: torch.Tensor, alignment: str, index: int) -> PreparedPair:
    """A pair's clean run and its corrupted run's node outputs at the clean positions, this stage's part (the
    embeddings on the first stage, the metrics on the last)."""
    aligned = align_pair(clean[0].tolist(), corrupted[0].tolist(), alignment, index)
    clean_nodes, clean_metric = stage_nodes(block, link, graph, metric, clean)
    corrupted_nodes, corrupted_metric = stage_nodes(block, link, graph, metric, corrupted)
    embeddings = aligned_embeddings(block.model, corrupted, aligned) if block.first else None
    return PreparedPair(index, clean, aligned, clean_nodes, corrupted_nodes.aligned(aligned.matrix()), embeddings,
                        clean_metric, corrupted_metric)


def stage_scores(block: LayerBlock, link: StageLink, graph: CircuitGraph, metric: Metric, pair: PreparedPair,
                 steps: int) -> dict[int, torch.Tensor]:
    """This stage's receivers' rows of EAP (steps 0) or EAP-IG scores."""
    clean_ids = pair.clean_ids
    rows_count, length = max(steps, 1), clean_ids.shape[1]
    with torch.enable_grad(), EdgePatch(block.model, graph, probing=True, layers=block.layers,
                                        logits=block.last) as hooks:
        if block.first:
            with torch.no_grad():
                received = interpolated(block.model.get_input_embeddings()(clean_ids), pair.corrupted_embeddings,
                                        steps)
        else:
            received = block.receive(link, (rows_count, length)).requires_grad_(True)
        final: dict[str, torch.Tensor] = {}
        if block.last:
            keep_final_residual(block.model, hooks, final)
        output = block.run(clean_ids, received, use_cache=False, logits_to_keep=1)
        gradient = None
        if block.last:
            output = metric.compute(output[:, -1], final["residual"]).sum()
        else:
            link.send_activation(output)
            gradient = link.receive_gradient(tuple(output.shape), output.dtype)
        wanted = hooks.gradients() + ([] if block.first else [received])
        grads = torch.autograd.grad(output, wanted, gradient, allow_unused=True)
    if not block.first:
        link.send_gradient(torch.zeros_like(received) if grads[-1] is None else grads[-1])
    gradients = hooks.mean_gradients(grads, rows_count)
    with torch.no_grad():
        own = node_differences(block.model, graph, pair.clean, pair.corrupted, block.layers)
    below = graph.nodes_before_attention(block.layers.start)
    upstream = own if block.first else torch.cat([link.receive_activation((below, *own.shape[1:]), own.dtype), own])
    if not block.last:
        link.send_activation(upstream)
    return score_rows(gradients, upstream, receiver_blocks(graph, block.layers, block.last))


def stage_circuit_metrics(block: LayerBlock, link: StageLink, graph: CircuitGraph, metric: Metric,
                          pair: PreparedPair, circuits: Sequence[torch.Tensor], batch_size: int) -> list[float]:
    """The metric of each circuit (the last stage's; an empty list elsewhere), batch by batch."""
    adjacency, clean_ids = graph.adjacency(), pair.clean_ids
    below = graph.nodes_before_attention(block.layers.start)
    after = graph.nodes_before_attention(block.layers.stop) if not block.last else graph.n_nodes
    values: list[float] = []
    for start in range(0, len(circuits), batch_size):
        kept = torch.stack(list(circuits[start:start + batch_size]))
        rows, length = kept.shape[0], clean_ids.shape[1]
        upstream, received = None, None
        if not block.first:
            received = block.receive(link, (rows, length))
            upstream = link.receive_activation((rows, below, length, block.model.config.hidden_size), block.dtype)
        tokens = clean_ids.expand(rows, -1)
        with torch.no_grad(), EdgePatch(block.model, graph, pair.corrupted, adjacency & ~kept, layers=block.layers,
                                        logits=block.last, upstream=upstream) as hooks:
            final: dict[str, torch.Tensor] = {}
            if block.last:
                keep_final_residual(block.model, hooks, final)
            output = block.run(tokens, received, use_cache=False, logits_to_keep=1)
            if block.last:
                values += metric.compute(output[:, -1], final["residual"]).tolist()
            else:
                link.send_activation(output)
                link.send_activation(hooks.stacked(after, output))
    return values



class ShardedPairs:
    """The pairs' computations on a layer-sharded model (`WholePairs`'s methods): each pipeline (replica) takes
    its share of the pairs, its stages each computing their own part."""

    def __init__(self, model: nn.Module, graph: CircuitGraph, metric: Metric,
                 pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], config: CircuitConfig) -> None:
        self.block, self.graph, self.metric, self.pairs, self.config = block_of(model), graph, metric, pairs, config
        self.prepared: dict[int, PreparedPair] = {}

    def mine(self) -> list[int]:
        return distributed.assign_round_robin(len(self.pairs), self.block.replica, self.block.replicas)

    def _run(self, work: Any) -> Any:
        link = self.block.link()
        try:
            return work(link)
        finally:
            link.finish()

    def prepare(self, index: int) -> PreparedPair:
        if index not in self.prepared:
            clean, corrupted = (ids.to(self.block.device) for ids in self.pairs[index])
            self.prepared[index] = self._run(lambda link: stage_pair(self.block, link, self.graph, self.metric, clean,
                                                                     corrupted, self.config.alignment, index))
        return self.prepared[index]

    def score(self, index: int) -> dict[str, Any]:
        pair, graph = self.prepare(index), self.graph
        eap = self._run(lambda link: stage_scores(self.block, link, graph, self.metric, pair, 0))
        eap_ig = self._run(lambda link: stage_scores(self.block, link, graph, self.metric, pair,
                                                     self.config.ig_steps))
        empty = self._run(lambda link: stage_circuit_metrics(self.block, link, graph, self.metric, pair,
                                                             [torch.zeros_like(graph.adjacency())], 1))
        return {"eap": eap, "eap_ig": eap_ig, "clean": pair.clean_metric, "corrupted": pair.corrupted_metric,
                "empty": empty[0] if empty else None}

    def measure(self, index: int, edges: Sequence[tuple[int, int]],
                circuits: Sequence[torch.Tensor]) -> tuple[list[float], list[float]] | None:
        pair, size = self.prepare(index), self.config.batch_size
        exact = self._run(lambda link: stage_circuit_metrics(self.block, link, self.graph, self.metric, pair,
                                                             all_but(self.graph, edges), size))
        values = self._run(lambda link: stage_circuit_metrics(self.block, link, self.graph, self.metric, pair,
                                                              circuits, size))
        if not self.block.last:
            return None
        return [value - pair.clean_metric for value in exact], values

    def combine_scores(self, parts: Sequence[dict[str, Any]]) -> PairValues:
        rows = {name: {receiver: row for part in parts for receiver, row in part[name].items()}
                for name in ("eap", "eap_ig")}
        last = next(part for part in parts if part["clean"] is not None)
        return PairValues(score_matrix(self.graph, rows["eap"]), score_matrix(self.graph, rows["eap_ig"]),
                          last["clean"], last["corrupted"], last["empty"])

    @staticmethod
    def combine_measures(parts: Sequence[Any]) -> tuple[list[float], list[float]]:
        return next(part for part in parts if part is not None)
