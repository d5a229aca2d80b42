"""One forward pass in which every receiver reads its own input.

A receiver's input is the residual stream where it reads it (before its norm): the sum of what every node before
it wrote. `EdgePatch` gives each receiver, in each row of a batch, its own offset to that sum:

- *probes*: zero tensors, one per receiver, shared by the rows; their gradients are ∂metric/∂(receiver input)
  (summed over the rows), what EAP and EAP-IG score with;
- *excluded edges* [rows, receivers, nodes]: for an excluded edge u → v, v reads u's output from the corrupted
  run instead of this run's: offset −(a_u(this run) − a_u(corrupted)). A circuit excludes every edge outside it;
  exact edge patching excludes one edge per row.

Attention's receivers are its query heads and key/value heads: each gets its own copy of the residual, its own
norm (the layer's norm module, applied to the copies) and its own slice of q_proj, k_proj or v_proj; only these
projections' outputs change, so the residual stream itself flows on untouched. The hooks sit on the sites of the
one naming scheme (models.hooks): `attn_in`, `q`, `k`, `v`, `attn_head`, `mlp_in`, `mlp_out`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from safeneurons.interp.patching.hooks import keeper, patched_forward
from safeneurons.models.hooks import Hooks, replace_first, site_point

if TYPE_CHECKING:
    from safeneurons.interp.circuits.graph import CircuitGraph
    from safeneurons.interp.patching.hooks import RunOutput

PARTS = ("q", "k", "v")


def align_rows(matrix: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`'s rows (one a token of another prompt) at the positions `matrix` (pairs.PairAlignment.matrix)
    maps them to, computed in float64."""
    return (matrix.to(tensor.device) @ tensor.double()).to(tensor.dtype)


@dataclass
class NodeOutputs:
    """What a run's nodes write, one row a token: the input embeddings [T, D]; per layer the input of o_proj
    [T, heads · head_dim] (a head's output is its slice through o_proj) and the MLP's output [T, D]."""

    embeddings: torch.Tensor | None  # None, and the layers' entries, where a layer-sharded stage holds none
    heads: list[torch.Tensor | None]
    mlps: list[torch.Tensor | None]

    def aligned(self, matrix: torch.Tensor) -> "NodeOutputs":
        """The values at another prompt's positions (`matrix` from pairs.PairAlignment)."""
        def align(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else align_rows(matrix, tensor)
        return NodeOutputs(align(self.embeddings), [align(t) for t in self.heads], [align(t) for t in self.mlps])

    def toward(self, other: "NodeOutputs", scale: float) -> "NodeOutputs":
        """self + scale · (other − self), node by node (scale 1 is `other` itself)."""
        if scale == 1.0:
            return other

        def mix(mine: torch.Tensor | None, theirs: torch.Tensor | None) -> torch.Tensor | None:
            return None if mine is None else mine + scale * (theirs - mine)
        return NodeOutputs(mix(self.embeddings, other.embeddings), [mix(*p) for p in zip(self.heads, other.heads)],
                           [mix(*p) for p in zip(self.mlps, other.mlps)])


def node_keepers(cache: dict[tuple[int, str], torch.Tensor], layers: range) -> dict[tuple[int, str], Any]:
    """Edits that keep every node output of `layers` (one prompt) in `cache`, and the input embeddings with
    layer 0."""
    keys = [(0, "attn_in")] if 0 in layers else []
    keys += [(layer, part) for layer in layers for part in ("attn_head", "mlp_out")]
    return {key: keeper(cache, key, lambda a: a[0].detach()) for key in keys}


def node_outputs(cache: dict[tuple[int, str], torch.Tensor], n_layers: int) -> NodeOutputs:
    return NodeOutputs(cache.get((0, "attn_in")), [cache.get((layer, "attn_head")) for layer in range(n_layers)],
                       [cache.get((layer, "mlp_out")) for layer in range(n_layers)])


def record_nodes(model: nn.Module, input_ids: torch.Tensor | None = None,
                 inputs_embeds: torch.Tensor | None = None) -> tuple[NodeOutputs, RunOutput]:
    """One plain forward pass of one prompt: its nodes' outputs and its last-position logits and residual."""
    n_layers = len(model.model.layers)
    cache: dict[tuple[int, str], torch.Tensor] = {}
    with torch.no_grad():
        out = patched_forward(model, node_keepers(cache, range(n_layers)), input_ids, inputs_embeds)
    return node_outputs(cache, n_layers), out


def head_outputs(weight: torch.Tensor, inputs: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[..., heads, T, D] each head's output: its slice of o_proj's input [..., T, heads · head_dim] through o_proj
    (`weight`)."""
    per_head = inputs.reshape(*inputs.shape[:-1], n_heads, -1)
    return torch.einsum("...the,dhe->...htd", per_head, weight.reshape(weight.shape[0], n_heads, -1))


def node_differences(model: nn.Module, graph: CircuitGraph, clean: NodeOutputs, corrupted: NodeOutputs,
                     layers: range | None = None) -> torch.Tensor:
    """[nodes, T, D] a_u(corrupted) − a_u(clean) for every node (of `layers`, with the input on layer 0's stage),
    in the graph's node order."""
    layers = range(graph.n_layers) if layers is None else layers
    rows = [(corrupted.embeddings - clean.embeddings)[None]] if 0 in layers else []
    for layer in layers:
        weight = site_point(model, layer, "attn_head").module.weight
        rows.append(head_outputs(weight, corrupted.heads[layer] - clean.heads[layer], graph.n_heads))
        rows.append((corrupted.mlps[layer] - clean.mlps[layer])[None])
    return torch.cat(rows)


def node_groups(graph: CircuitGraph) -> list[tuple[int, int]]:
    """(first node, count) of the nodes written together: the input, each layer's heads, each layer's MLP."""
    groups = [(0, 1)]
    for layer in range(graph.n_layers):
        groups += [(graph.head_node(layer, 0), graph.n_heads), (graph.mlp_node(layer), 1)]
    return groups


class EdgePatch(Hooks):
    """Hooks under which every receiver reads the residual stream plus its own offset (the module docstring)."""

    def __init__(self, model: nn.Module, graph: CircuitGraph, corrupted: NodeOutputs | None = None,
                 excluded: torch.Tensor | None = None, probing: bool = False, layers: range | None = None,
                 logits: bool = True, upstream: torch.Tensor | None = None) -> None:
        """`layers` and `logits`: a layer-sharded stage's own (its receivers and nodes); `upstream` [B, nodes,
        T, D]: the differences of the nodes of the stages below, as the stage below sends them."""
        super().__init__()
        self.model, self.graph, self.corrupted, self.probing = model, graph, corrupted, probing
        self.excluded = excluded
        self.probes: dict[int, torch.Tensor] = {}  # first receiver -> [receivers, T, D] zeros, requires grad
        self.differences: list[tuple[int, torch.Tensor]] = []  # (first node, [B, nodes, T, D]) of this pass
        self.normed: dict[int, torch.Tensor] = {}  # layer -> [B, attention receivers, T, D]
        for first, count in node_groups(graph):
            if upstream is not None and first + count <= upstream.shape[1] and self._read_excluded(first, count):
                self.differences.append((first, upstream[:, first:first + count]))
        for layer in range(graph.n_layers) if layers is None else layers:
            self.on_input(site_point(model, layer, "attn_in").module, partial(self._attention_input, layer))
            for part in PARTS:
                self.on_output(site_point(model, layer, part).module, partial(self._projection, layer, part))
            self.on_input(site_point(model, layer, "attn_head").module, partial(self._heads, layer))
            self.on_input(site_point(model, layer, "mlp_in").module, partial(self._mlp_input, layer))
            self.on_output(site_point(model, layer, "mlp_out").module, partial(self._mlp_output, layer))
        if logits:
            self.on_input(model.model.norm, self._final_input)

    # --------------------------------------------------------------------------------------------- offsets
    def _excluding(self, first: int, count: int, nodes: slice) -> bool:
        return self.excluded is not None and bool(self.excluded[:, first:first + count, nodes].any())

    def _offset(self, first: int, count: int, upstream: int, x: torch.Tensor) -> torch.Tensor | None:
        """[B or 1, count, T, D] the offsets of receivers first … first + count − 1, which read `upstream` nodes of
        the residual `x` [B, T, D]; None when there is none."""
        offset = None
        if self.probing:
            probe = torch.zeros(count, *x.shape[1:], dtype=x.dtype, device=x.device, requires_grad=True)
            self.probes[first] = probe
            offset = probe[None]
        for start, difference in self.differences:
            stop = start + difference.shape[1]
            if stop > upstream or not self._excluding(first, count, slice(start, stop)):
                continue
            mask = self.excluded[:, first:first + count, start:stop].to(difference.dtype)
            correction = torch.einsum("brn,bntd->brtd", mask, difference)
            offset = -correction if offset is None else offset - correction
        return offset

    def _read_excluded(self, first: int, count: int) -> bool:
        """Whether some receiver excludes an edge from nodes first … first + count − 1 (then their differences
        are kept)."""
        return self.corrupted is not None and self._excluding(0, self.graph.n_receivers, slice(first, first + count))

    def stacked(self, nodes: int, like: torch.Tensor) -> torch.Tensor:
        """[B, nodes, T, D] the differences of the first `nodes` nodes (zeros where none was kept): what a stage
        sends to the next."""
        stack = like.new_zeros(like.shape[0], nodes, *like.shape[1:])
        for first, difference in self.differences:
            if first < nodes:
                stack[:, first:first + difference.shape[1]] = difference
        return stack

    # --------------------------------------------------------------------------------------------- hooks
    def _attention_input(self, layer: int, module: nn.Module, args: tuple) -> None:
        x = args[0]
        if layer == 0 and self._read_excluded(0, 1):
            self.differences.append((0, x[:, None] - self.corrupted.embeddings))
        graph = self.graph
        offset = self._offset(graph.attention_receiver(layer), graph.attention_receivers,
                              graph.nodes_before_attention(layer), x)
        self.normed.pop(layer, None)
        if offset is not None:  # the module's own forward (not its hooks) on every receiver's copy
            self.normed[layer] = module.forward(x[:, None] + offset)

    def _projection(self, layer: int, part: str, module: nn.Module, _args: tuple, output: torch.Tensor) -> Any:
        normed = self.normed.get(layer)
        if normed is None:
            return None
        heads, groups = self.graph.n_heads, self.graph.n_kv_heads
        receivers = {"q": slice(0, heads), "k": slice(heads, heads + groups),
                     "v": slice(heads + groups, heads + 2 * groups)}[part]
        count = receivers.stop - receivers.start
        weight = module.weight.reshape(count, -1, module.in_features)
        projected = torch.einsum("bntd,ned->btne", normed[:, receivers], weight).reshape(output.shape)
        return projected if module.bias is None else projected + module.bias

    def _heads(self, layer: int, module: nn.Module, args: tuple) -> None:
        if not self._read_excluded(self.graph.head_node(layer, 0), self.graph.n_heads):
            return
        difference = head_outputs(module.weight, args[0] - self.corrupted.heads[layer], self.graph.n_heads)
        self.differences.append((self.graph.head_node(layer, 0), difference))

    def _mlp_input(self, layer: int, _module: nn.Module, args: tuple) -> Any:
        offset = self._offset(self.graph.mlp_receiver(layer), 1, self.graph.nodes_before_mlp(layer), args[0])
        return None if offset is None else replace_first(args, lambda x: x + offset[:, 0])

    def _mlp_output(self, layer: int, _module: nn.Module, _args: tuple, output: Any) -> None:
        if self._read_excluded(self.graph.mlp_node(layer), 1):
            value = output[0] if isinstance(output, tuple) else output
            self.differences.append((self.graph.mlp_node(layer), value[:, None] - self.corrupted.mlps[layer]))

    def _final_input(self, _module: nn.Module, args: tuple) -> Any:
        offset = self._offset(self.graph.logits_receiver, 1, self.graph.n_nodes, args[0])
        return None if offset is None else replace_first(args, lambda x: x + offset[:, 0])

    def gradients(self) -> list[torch.Tensor]:
        """The probes in receiver order (to differentiate against)."""
        return [self.probes[first] for first in sorted(self.probes)]

    def mean_gradients(self, grads: Sequence[torch.Tensor | None], rows: int) -> torch.Tensor:
        """[probed receivers, T, D] the probes' gradients `grads` (None: no path to the metric, zero), averaged
        over the `rows` they were summed over."""
        blocks = [torch.zeros_like(probe) if grad is None else grad for probe, grad in zip(self.gradients(), grads)]
        return torch.cat(blocks).detach() / rows
