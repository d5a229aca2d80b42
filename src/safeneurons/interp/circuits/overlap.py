"""Whether a circuit's heads and MLPs are where `score` puts the safety-critical weights.

A head's weights are its rows of q_proj, its key/value head's rows of k_proj and v_proj and its columns of o_proj;
an MLP's (or MoE block's) are every weight under `mlp.`. The mask's share in the circuit's nodes is the fraction
of its selected weights that lie in those weights; a random mask of the same size puts there, in expectation,
the nodes' fraction of all the masked matrices' weights.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Mapping

import torch

if TYPE_CHECKING:
    from safeneurons.interp.circuits.graph import CircuitGraph

LAYER = re.compile(r"layers\.(\d+)\.")


def node_weights(name: str, shape: tuple[int, ...], graph: CircuitGraph, nodes: torch.Tensor) -> torch.Tensor | None:
    """[shape] True on the weights of parameter `name` that belong to a chosen node; None for a parameter of no
    node (embeddings, norms)."""
    found = LAYER.search(name)
    if found is None:
        return None
    layer = int(found.group(1))
    inside = torch.zeros(shape, dtype=torch.bool)
    heads = nodes[graph.head_node(layer, 0):graph.mlp_node(layer)]
    if ".mlp." in name:
        inside[...] = bool(nodes[graph.mlp_node(layer)])
        return inside
    parts = {"q_proj": (graph.n_heads, 0), "k_proj": (graph.n_kv_heads, 0), "v_proj": (graph.n_kv_heads, 0),
             "o_proj": (graph.n_heads, 1)}
    part = next((key for key in parts if f"self_attn.{key}." in name), None)
    if part is None or len(shape) != 2:
        return None
    count, axis = parts[part]
    width = shape[axis] // count
    per_group = graph.n_heads // count  # query heads a key/value head serves (1 for q and o)
    for index in range(count):
        if bool(heads[index * per_group:(index + 1) * per_group].any()):
            inside.narrow(axis, index * width, width).fill_(True)
    return inside


def mask_share(masks: Mapping[str, torch.Tensor], graph: CircuitGraph, nodes: torch.Tensor) -> dict[str, float]:
    """The mask's share of selected weights in the chosen nodes, against a random mask's expected share."""
    selected = selected_inside = weights = weights_inside = 0
    for name, mask in masks.items():
        inside = node_weights(name, tuple(mask.shape), graph, nodes)
        if inside is None:
            continue
        selected += int(mask.sum())
        selected_inside += int((mask & inside).sum())
        weights += mask.numel()
        weights_inside += int(inside.sum())
    share = selected_inside / selected if selected else float("nan")
    expected = weights_inside / weights if weights else float("nan")
    return {"mask_share": share, "random_share": expected,
            "enrichment": share / expected if expected else float("nan"), "selected_weights": selected}
