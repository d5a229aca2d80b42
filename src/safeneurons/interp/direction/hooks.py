"""Directional ablation and activation addition as forward hooks, batched over candidate directions: a batch of
C × B rows is C copies of B prompts, and copy c is edited with direction c (so that one forward pass scores C
candidates, as patching batches its sites).

Ablation (x ← x − (x·r̂) r̂) edits every block's input and every write to the residual stream, at every position
(during generation too, where each step sees the new token). The writes are the attention and MLP outputs, or, in
architectures that normalise them before the residual add (Gemma-2/3's post-norms), those norms' outputs.
Addition (x ← x + c·r) edits one block's input, at every position.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from safeneurons.models.hooks import Hooks
from safeneurons.models.structure import decoder_layers


def residual_writes(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The two modules whose outputs a decoder block adds to the residual stream."""
    if hasattr(block, "post_feedforward_layernorm"):  # Gemma-2/3: the outputs are normalised before the add
        return block.post_attention_layernorm, block.post_feedforward_layernorm
    return block.self_attn, block.mlp


def has_post_norms(model: nn.Module) -> bool:
    return hasattr(decoder_layers(model)[0], "post_feedforward_layernorm")


def unit_directions(directions: torch.Tensor) -> torch.Tensor:
    """[C, H] rows scaled to norm 1 (float32). A zero row stays zero, so its ablation changes nothing: the
    candidates at layer 0 are zero, since every prompt has the same template tokens' embeddings there."""
    directions = directions.detach().float().reshape(-1, directions.shape[-1])
    norms = directions.norm(dim=-1, keepdim=True)
    return torch.where(norms > 0, directions / norms.clamp(min=torch.finfo(torch.float32).tiny), 0.0)


def _project_out(activation: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    copies, hidden = units.shape
    rows = activation.reshape(copies, -1, hidden)  # [C, B·T, H]
    unit = units.to(activation)
    projections = torch.bmm(rows, unit[:, :, None])  # [C, B·T, 1]
    return torch.baddbmm(rows, projections, unit[:, None, :], alpha=-1).view_as(activation)


def _edit_output(output: Any, edit: Any) -> Any:
    return (edit(output[0]), *output[1:]) if isinstance(output, tuple) else edit(output)


def _edit_input(args: tuple, kwargs: dict, edit: Any) -> tuple[tuple, dict]:
    if args:
        return (edit(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}


def ablation(model: nn.Module, directions: torch.Tensor) -> Hooks:
    """Hooks ablating `directions` ([H], or [C, H] for C copies of the batch) everywhere."""
    units = unit_directions(directions)
    hooks = Hooks()

    def edit(activation: torch.Tensor) -> torch.Tensor:
        return _project_out(activation, units)

    for block in decoder_layers(model):
        hooks.on_input(block, lambda _module, args, kwargs: _edit_input(args, kwargs, edit), with_kwargs=True)
        for module in residual_writes(block):
            hooks.on_output(module, lambda _module, _args, output: _edit_output(output, edit))
    return hooks


def addition(model: nn.Module, vectors: torch.Tensor, layers: Sequence[int], coefficient: float = 1.0) -> Hooks:
    """Hooks adding `coefficient × vectors[c]` to the input of block `layers[c]` for copy c of the batch (the other
    copies pass that block unchanged)."""
    vectors = vectors.detach().float().reshape(-1, vectors.shape[-1])
    hooks = Hooks()
    blocks = decoder_layers(model)
    for layer in sorted(set(layers)):
        chosen = torch.tensor([index for index, value in enumerate(layers) if value == layer])

        def edit(activation: torch.Tensor, chosen: torch.Tensor = chosen) -> torch.Tensor:
            rows = activation.clone().view(len(layers), -1, *activation.shape[1:])
            rows[chosen] += coefficient * vectors[chosen].to(activation)[:, None, None, :]
            return rows.view_as(activation)

        hooks.on_input(blocks[layer], lambda _module, args, kwargs, edit=edit: _edit_input(args, kwargs, edit),
                       with_kwargs=True)
    return hooks
