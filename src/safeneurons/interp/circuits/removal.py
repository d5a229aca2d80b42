"""Whether removing the circuit breaks refusal while the model answers.

The circuit's heads and MLPs have their outputs replaced by their mean over the harmless prompts' tokens (mean
ablation: the corrupted distribution, since generated positions have no aligned corrupted prompt) at every
position and every generated token, while the model answers held-out harmful prompts greedily. Random node sets
of the same numbers of heads and MLPs (one per seed) are the control. Refusal and attack success are judged by
substrings, with 95% Wilson intervals.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from torch import nn

from safeneurons.evaluation.decoding import Decoding
from safeneurons.evaluation.generation import generate_distributed
from safeneurons.interp.circuits.forward import record_nodes
from safeneurons.interp.direction.effects import judged
from safeneurons.models.hooks import Hooks, site_point

if TYPE_CHECKING:
    from safeneurons.interp.circuits.forward import NodeOutputs
    from safeneurons.interp.circuits.graph import CircuitGraph


def mean_outputs(model: nn.Module, prompts: Sequence[torch.Tensor],
                 record: Callable[[torch.Tensor], NodeOutputs] | None = None) -> NodeOutputs:
    """Every node's output averaged over all tokens of `prompts` (each [1, T]), as one token [1, …]; `record`
    gives a prompt's node outputs (a layer-sharded stage's own; default: `record_nodes` on the whole model)."""
    runs = [(record or (lambda ids: record_nodes(model, ids)[0]))(ids) for ids in prompts]
    first = runs[0]

    def mean(pick: Any) -> torch.Tensor | None:
        if pick(first) is None:
            return None
        return torch.cat([pick(run) for run in runs]).double().mean(0, keepdim=True).to(pick(first).dtype)
    return type(first)(mean(lambda run: run.embeddings),
                       [mean(lambda run, layer=layer: run.heads[layer]) for layer in range(len(first.heads))],
                       [mean(lambda run, layer=layer: run.mlps[layer]) for layer in range(len(first.mlps))])


@contextlib.contextmanager
def ablated(model: nn.Module, graph: CircuitGraph, nodes: torch.Tensor, means: NodeOutputs) -> Iterator[None]:
    """The chosen heads' slices of o_proj's input and the chosen MLPs' outputs set to their means."""
    hooks = Hooks()
    for layer in range(graph.n_layers):
        width = site_point(model, layer, "attn_head").module.in_features // graph.n_heads
        heads = [head for head in range(graph.n_heads) if bool(nodes[graph.head_node(layer, head)])]
        if heads:
            columns = torch.cat([torch.arange(head * width, (head + 1) * width) for head in heads])

            def heads_edit(value: torch.Tensor, columns: torch.Tensor = columns, layer: int = layer) -> torch.Tensor:
                edited = value.clone()
                edited[..., columns] = means.heads[layer][0, columns].to(value.dtype)
                return edited
            hooks.on_edit(site_point(model, layer, "attn_head"), heads_edit)
        if bool(nodes[graph.mlp_node(layer)]):
            hooks.on_edit(site_point(model, layer, "mlp_out"),
                          lambda value, layer=layer: means.mlps[layer].to(value.dtype).expand_as(value))
    with hooks:
        yield


def random_nodes(graph: CircuitGraph, nodes: torch.Tensor, seed: int) -> torch.Tensor:
    """As many heads and MLPs as `nodes` has, drawn uniformly (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.zeros_like(nodes)
    for pool in (graph.head_nodes(), graph.mlp_nodes()):
        count = int(nodes[pool].sum())
        picked = torch.randperm(len(pool), generator=generator)[:count]
        chosen[torch.tensor(pool)[picked]] = True
    return chosen


def removal_study(model: nn.Module, tokenizer: Any, graph: CircuitGraph, nodes: torch.Tensor,
                  harmful: Sequence[str], harmless: Sequence[torch.Tensor], seeds: int, max_new_tokens: int,
                  batch_size: int, judge: str = "keyword",
                  record: Callable[[torch.Tensor], NodeOutputs] | None = None) -> dict[str, Any] | None:
    """Collective: refusal and ASR on `harmful` at baseline, with the circuit's nodes removed, and with random node
    sets of the same size; on rank 0, None elsewhere."""
    means = mean_outputs(model, harmless, record)
    decoding = Decoding(max_new_tokens=max_new_tokens)

    def under(chosen: torch.Tensor | None, desc: str) -> dict[str, Any] | None:
        context = contextlib.nullcontext() if chosen is None else ablated(model, graph, chosen, means)
        with context:
            found = generate_distributed(model, tokenizer, harmful, decoding, batch_size, desc=desc)
        return judged(None if found is None else [texts[0] for texts in found], judge)
    results = {"baseline": under(None, "baseline"), "circuit": under(nodes, "circuit removed"),
               "random": [under(random_nodes(graph, nodes, seed), f"random nodes {seed}") for seed in range(seeds)]}
    if results["baseline"] is None:
        return None
    return {**results, "prompts": len(harmful), "heads": int(nodes[graph.head_nodes()].sum()),
            "mlps": int(nodes[graph.mlp_nodes()].sum()), "max_new_tokens": max_new_tokens, "judge": judge}
