"""The hooks that read and write a site's activations during a patched forward."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

from safeneurons.models.hooks import Hooks, SiteKey, replace_first, site_point
from safeneurons.models.structure import decoder_layers, layers_from

if TYPE_CHECKING:
    from safeneurons.interp.patching.sites import Edit


def site_edits(model: nn.Module, edits: dict[SiteKey, Edit]) -> Hooks:
    """Hooks in which `edit` rewrites each (layer, component) activation; heads edit the input of o_proj."""
    hooks = Hooks()
    for (layer, component), edit in edits.items():
        hooks.on_edit(site_point(model, layer, component), edit)
    return hooks


def keeper(store: dict, key: Any, select: Callable[[torch.Tensor], torch.Tensor]) -> Edit:
    """An edit that stores `select(activation)` under `key` and changes nothing."""
    def keep(activation: torch.Tensor) -> torch.Tensor:
        store[key] = select(activation)
        return activation
    return keep


@dataclass
class RunOutput:
    logits: torch.Tensor  # [B, vocab] at the last position
    residual: torch.Tensor  # [B, hidden]: the last decoder layer's output at the last position (before the norm)


def patched_forward(model: nn.Module, edits: dict[SiteKey, Edit], input_ids: torch.Tensor | None = None,
             inputs_embeds: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
             start: int = 0) -> RunOutput:
    """The model's last-position logits and final residual with `edits` applied. With `start` > 0,
    `inputs_embeds` are the hidden states entering decoder layer `start` and only layers from there run."""
    final: dict[str, torch.Tensor] = {}
    position_ids = None
    if attention_mask is not None:  # left padding: positions count real tokens only
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hooks = site_edits(model, edits)
    keep_final_residual(model, hooks, final)
    with hooks, layers_from(model, start):  # hooks attach to the modules before the cut
        out = model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                    position_ids=position_ids, use_cache=False, logits_to_keep=1)
    return RunOutput(out.logits[:, -1], final["residual"])


def layer_inputs(model: nn.Module, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """The hidden states entering every decoder layer in one run of `input_ids` (batch 1)."""
    entries: dict[int, torch.Tensor] = {}
    with Hooks() as hooks, torch.no_grad():
        record_layer_inputs(hooks, dict(enumerate(decoder_layers(model))), entries)
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    return entries


def record_layer_inputs(hooks: Hooks, layers: Mapping[int, nn.Module], entries: dict[int, torch.Tensor]) -> None:
    """Hooks that keep in `entries[index]` the hidden states entering each decoder layer of `layers`."""
    for index, layer in layers.items():
        hooks.on_input(layer, lambda _module, args, kwargs, index=index: entries.__setitem__(
            index, (args[0] if args else kwargs["hidden_states"]).detach()), with_kwargs=True)


def keep_final_residual(model: nn.Module, hooks: Hooks, final: dict[str, torch.Tensor]) -> None:
    """A hook that keeps in `final["residual"]` the last position's input to the final norm: the residual after
    every patch of the last layer."""
    keep = keeper(final, "residual", lambda activation: activation[:, -1])
    hooks.on_input(model.model.norm, lambda _m, args: replace_first(args, keep))
