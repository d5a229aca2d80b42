"""The computational graph of an edge-level circuit: nodes, receivers and the edges between them.

Nodes write into the residual stream: the input embeddings, every attention head (its slice through o_proj, the
`attn_head` site), every MLP or MoE block (`mlp_out`). Receivers read from it: every query head (`q`), every
key/value head (`k`, `v`; grouped-query attention has fewer of these than query heads, so its edges are exact),
every MLP (`mlp_in`) and the logits. An edge runs from every node to every receiver after it: a layer's MLP reads
its own layer's heads, its attention does not. Nodes and receivers are ordered so that the nodes a receiver reads
are a prefix of the node list.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import torch

from safeneurons.errors import SafeneuronsError
from safeneurons.models.structure import decoder_layers

LOGITS = "logits"
INPUT = "input"
# Layers whose residual stream is a plain sum of what attention and the MLP write: their outputs pass no norm
LAYOUT = ("decoder layers with input_layernorm → separate q_proj, k_proj, v_proj, o_proj → residual, and "
          "post_attention_layernorm → mlp → residual (Llama, Mistral, Qwen2/3, SmolLM2, Mixtral, Qwen-MoE, OLMoE, "
          "GPT-OSS)")
OUTPUT_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")  # Gemma-2/3: outputs are normed


def check_layout(model: Any, name: str = "") -> None:
    """Refuse a model whose layers do not write into the residual stream additively (one line, before any weight
    is read when `model` is the skeleton on the meta device)."""
    for index, layer in enumerate(decoder_layers(model)):
        attention = getattr(layer, "self_attn", None)
        missing = [part for part in ("input_layernorm", "post_attention_layernorm", "mlp") if not hasattr(layer, part)]
        missing += [f"self_attn.{proj}" for proj in ("q_proj", "k_proj", "v_proj", "o_proj")
                    if not isinstance(getattr(attention, proj, None), torch.nn.Linear)]
        normed = [part for part in OUTPUT_NORMS if hasattr(layer, part)]
        if missing or normed:
            reason = f"has no {', '.join(missing)}" if missing else f"norms its block outputs ({', '.join(normed)})"
            raise SafeneuronsError(f"model {name or type(model).__name__} ({model.config.model_type!r}): layer {index} "
                                   f"{reason}; edge circuits need {LAYOUT}")


@dataclass(frozen=True)
class CircuitGraph:
    n_layers: int
    n_heads: int
    n_kv_heads: int

    @classmethod
    def of(cls, model: Any) -> "CircuitGraph":
        config = model.config
        heads = int(config.num_attention_heads)
        return cls(len(decoder_layers(model)), heads, int(getattr(config, "num_key_value_heads", None) or heads))

    # ----------------------------------------------------------------------------------------- numbering
    @property
    def attention_receivers(self) -> int:
        """q of every head, then k and v of every key/value head."""
        return self.n_heads + 2 * self.n_kv_heads

    @property
    def n_nodes(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def n_receivers(self) -> int:
        return self.n_layers * (self.attention_receivers + 1) + 1

    def head_node(self, layer: int, head: int) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_node(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def head_nodes(self) -> list[int]:
        return [self.head_node(layer, head) for layer in range(self.n_layers) for head in range(self.n_heads)]

    def mlp_nodes(self) -> list[int]:
        return [self.mlp_node(layer) for layer in range(self.n_layers)]

    def attention_receiver(self, layer: int) -> int:
        """The first of layer `layer`'s attention receivers."""
        return layer * (self.attention_receivers + 1)

    def mlp_receiver(self, layer: int) -> int:
        return layer * (self.attention_receivers + 1) + self.attention_receivers

    @property
    def logits_receiver(self) -> int:
        return self.n_receivers - 1

    def nodes_before_attention(self, layer: int) -> int:
        """How many nodes (a prefix) layer `layer`'s attention reads."""
        return 1 + layer * (self.n_heads + 1)

    def nodes_before_mlp(self, layer: int) -> int:
        return self.nodes_before_attention(layer) + self.n_heads

    def upstream(self) -> torch.Tensor:
        """[receivers] the number of nodes each receiver reads (a prefix of the nodes)."""
        counts = []
        for layer in range(self.n_layers):
            counts += [self.nodes_before_attention(layer)] * self.attention_receivers
            counts.append(self.nodes_before_mlp(layer))
        counts.append(self.n_nodes)
        return torch.tensor(counts)

    def adjacency(self) -> torch.Tensor:
        """[receivers, nodes] True where an edge exists."""
        return torch.arange(self.n_nodes)[None, :] < self.upstream()[:, None]

    @property
    def n_edges(self) -> int:
        return int(self.upstream().sum())

    # ----------------------------------------------------------------------------------------- names
    def node_names(self) -> list[str]:
        names = [INPUT]
        for layer in range(self.n_layers):
            names += [f"L{layer}.attn_head.h{head}" for head in range(self.n_heads)] + [f"L{layer}.mlp_out"]
        return names

    def receiver_names(self) -> list[str]:
        names = []
        for layer in range(self.n_layers):
            names += [f"L{layer}.q.h{head}" for head in range(self.n_heads)]
            names += [f"L{layer}.{part}.g{group}" for part in ("k", "v") for group in range(self.n_kv_heads)]
            names.append(f"L{layer}.mlp_in")
        return names + [LOGITS]

    def edge_names(self) -> list[str]:
        """`node->receiver` of every edge, in the order of `adjacency().nonzero()` (receiver-major)."""
        nodes, receivers = self.node_names(), self.receiver_names()
        return [f"{nodes[u]}->{receivers[r]}" for r, u in self.adjacency().nonzero().tolist()]

    # ----------------------------------------------------------------------------------------- connectivity
    def fed_nodes(self, receiver: int) -> list[int]:
        """The nodes a receiver's value flows into (none for the logits)."""
        if receiver == self.logits_receiver:
            return []
        layer, offset = divmod(receiver, self.attention_receivers + 1)
        if offset == self.attention_receivers:
            return [self.mlp_node(layer)]
        if offset < self.n_heads:
            return [self.head_node(layer, offset)]
        group = (offset - self.n_heads) % self.n_kv_heads
        per_group = self.n_heads // self.n_kv_heads
        return [self.head_node(layer, head) for head in range(group * per_group, (group + 1) * per_group)]

    def node_receivers(self) -> list[list[int]]:
        """Per node, the receivers that feed it (none for the input)."""
        feeding: list[list[int]] = [[] for _ in range(self.n_nodes)]
        for receiver in range(self.n_receivers):
            for node in self.fed_nodes(receiver):
                feeding[node].append(receiver)
        return feeding

    def on_paths(self, kept: torch.Tensor) -> torch.Tensor:
        """`kept` [receivers, nodes] reduced to the edges on a path from the input to the logits (the others
        change nothing: their receiver's node reaches the logits only through corrupted edges, or their node
        reads only corrupted ones)."""
        kept = kept & self.adjacency()
        feeding = self.node_receivers()
        reached = torch.zeros(self.n_nodes, dtype=torch.bool)
        reached[0] = True
        for node in range(1, self.n_nodes):  # nodes are in topological order
            reached[node] = any(bool((kept[receiver] & reached).any()) for receiver in feeding[node])
        useful_node = torch.zeros(self.n_nodes, dtype=torch.bool)
        useful_receiver = torch.zeros(self.n_receivers, dtype=torch.bool)
        useful_receiver[self.logits_receiver] = True
        for node in reversed(range(self.n_nodes)):
            useful_node[node] = bool((kept[:, node] & useful_receiver).any())
            for receiver in feeding[node]:
                useful_receiver[receiver] |= bool(useful_node[node])
        return kept & reached[None, :] & useful_receiver[:, None]

    def greedy(self, scores: torch.Tensor, size: int) -> torch.Tensor:
        """A circuit of `size` edges grown from the logits: each step adds the highest-|score| edge into a receiver
        that already feeds the circuit (Hanna et al.'s greedy search)."""
        adjacency, magnitude = self.adjacency(), scores.abs()
        kept = torch.zeros_like(adjacency)
        heap: list[tuple[float, int, int]] = []
        active_nodes: set[int] = set()
        opened: set[int] = set()
        feeding = self.node_receivers()

        def open_receiver(receiver: int) -> None:
            if receiver in opened:  # a key/value head feeds several query heads
                return
            opened.add(receiver)
            for node in range(int(adjacency[receiver].sum())):
                heapq.heappush(heap, (-float(magnitude[receiver, node]), receiver, node))
        open_receiver(self.logits_receiver)
        while heap and int(kept.sum()) < size:
            _, receiver, node = heapq.heappop(heap)
            kept[receiver, node] = True
            if node not in active_nodes:
                active_nodes.add(node)
                for upstream in feeding[node]:
                    open_receiver(upstream)
        return kept

    def node_circuit(self, nodes: torch.Tensor) -> torch.Tensor:
        """[receivers, nodes] every edge between the chosen nodes (with the input and the logits): node-level
        patching's circuit drawn as edges."""
        chosen = nodes.clone()
        chosen[0] = True
        into = torch.zeros(self.n_receivers, dtype=torch.bool)
        into[self.logits_receiver] = True
        for receiver in range(self.n_receivers - 1):
            into[receiver] = bool(chosen[self.fed_nodes(receiver)].any())
        return self.adjacency() & into[:, None] & chosen[None, :]

    def check_size(self, size: int, what: str) -> None:
        if not 0 <= size <= self.n_edges:
            raise SafeneuronsError(f"{what} {size} is beyond the graph: it has {self.n_edges} edges")
