"""Positions, the base run's cache and batched patched passes (exact and attribution)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import nn

from safeneurons.errors import SafeneuronsError
from safeneurons.interp.patching.hooks import keeper, patched_forward
from safeneurons.interp.patching.sites import ACTIVATION_MEMORY_BUDGET, MAX_AUTO_BATCH
from safeneurons.masks.neurons import check_sets
from safeneurons.models.hooks import output_width, site_point
from safeneurons.models.moe import moe_blocks
from safeneurons.models.structure import decoder_layers, forward_row_bytes, model_device

if TYPE_CHECKING:
    from safeneurons.interp.patching.metrics import Metric
    from safeneurons.interp.patching.sites import Edit, PatchingSite, Position


def token_slices(position: Position, base_length: int, source_length: int) -> tuple[slice, slice]:
    """The base run's and the source run's token ranges of a position; `last` and negative indexes align the
    two prompts from the end, `all` and non-negative indexes need prompts of the same length."""
    if position == "last":
        position = -1
    if position != "all" and position < 0:
        if -position > min(base_length, source_length):
            raise SafeneuronsError(f"position {position} is before the start of a prompt of "
                                   f"{min(base_length, source_length)} tokens")
        return (slice(base_length + position, base_length + position + 1),
                slice(source_length + position, source_length + position + 1))
    if base_length != source_length:
        raise SafeneuronsError(f"position {position!r} needs the two prompts to have the same number of tokens; they "
                               f"have {base_length} and {source_length}. Use position 'last' (or a negative index), "
                               f"which aligns them from the end, or prompts of equal token length")
    if position == "all":
        return slice(0, base_length), slice(0, source_length)
    if position >= base_length:
        raise SafeneuronsError(f"position {position} is past the end of the prompts ({base_length} tokens)")
    return slice(position, position + 1), slice(position, position + 1)


def head_count(model: nn.Module) -> int:
    return int(model.config.num_attention_heads)


def expert_counts(model: nn.Module) -> dict[int, int]:
    """The number of routed experts of each MoE layer (none for a dense model)."""
    return {layer: block.num_experts for layer, block in moe_blocks(decoder_layers(model), model.config).items()}


def site_columns(model: nn.Module, site: PatchingSite) -> slice | torch.Tensor:
    """The hidden features a site covers: all of them, one head's slice of the input to o_proj, or the chosen MLP
    neurons (columns of down_proj's input)."""
    if site.neurons is not None:
        check_sets({site.layer: site.neurons}, len(decoder_layers(model)),
                   output_width(site_point(model, site.layer, "mlp_neuron")))
        return torch.tensor(site.neurons, dtype=torch.long)
    if site.expert is not None:
        experts = site_point(model, site.layer, "expert_out").moe.experts
        if not site.expert < experts.num_experts:
            raise SafeneuronsError(f"expert {site.expert} does not exist; layer {site.layer} has experts "
                                   f"0..{experts.num_experts - 1}")
        return slice(site.expert * experts.hidden, (site.expert + 1) * experts.hidden)
    if site.head is None:
        return slice(None)
    heads = head_count(model)
    if not 0 <= site.head < heads:
        raise SafeneuronsError(f"head {site.head} does not exist; the model has heads 0..{heads - 1}")
    head_dim = site_point(model, site.layer, "attn_head").module.in_features // heads
    return slice(site.head * head_dim, (site.head + 1) * head_dim)


@dataclass(frozen=True)
class _Patch:
    site: PatchingSite
    base_tokens: slice
    columns: slice | torch.Tensor  # a slice of features, or neuron indexes
    source_value: torch.Tensor  # [tokens, features] of the source run


def cache_run(model: nn.Module, input_ids: torch.Tensor, keys: Sequence[tuple[int, str]],
               metric: Metric) -> tuple[dict[tuple[int, str], torch.Tensor], float]:
    """One forward pass: the metric and the [tokens, features] activations of every (layer, component) asked."""
    cache: dict[tuple[int, str], torch.Tensor] = {}
    with torch.no_grad():
        out = patched_forward(model, {key: keeper(cache, key, lambda a: a[0].detach()) for key in keys}, input_ids)
        return cache, float(metric.compute(out.logits, out.residual)[0])


def _write_rows(patches: Sequence[tuple[int, _Patch]]) -> Edit:
    def edit(activation: torch.Tensor) -> torch.Tensor:
        patched = activation.clone()
        for row, patch in patches:
            patched[row, patch.base_tokens, patch.columns] = patch.source_value.to(patched.dtype)
        return patched
    return edit


def _patched_batch(model: nn.Module, base_ids: torch.Tensor, metric: Metric, batch: Sequence[_Patch],
                   entries: Mapping[int, torch.Tensor] | None = None) -> list[float]:
    """Row r of one forward pass is the base run with patch r; an empty batch runs the base run (ZeRO-3 filler).
    With the base run's layer inputs (`entries`), the pass starts at the batch's lowest patched layer: the layers
    below it are the base run's, unchanged by any patch."""
    rows: dict[tuple[int, str], list[tuple[int, _Patch]]] = {}
    for row, patch in enumerate(batch):
        rows.setdefault(patch.site.cache_key, []).append((row, patch))
    edits = {key: _write_rows(patches) for key, patches in rows.items()}
    size = max(len(batch), 1)
    start = min((patch.site.layer for patch in batch), default=0) if entries else 0
    with torch.no_grad():
        if start:
            out = patched_forward(model, edits, inputs_embeds=entries[start].expand(size, -1, -1), start=start)
        else:
            out = patched_forward(model, edits, base_ids.expand(size, -1))
        return metric.compute(out.logits, out.residual).tolist()[:len(batch)]


def attribution_batch(model: nn.Module, base_ids: torch.Tensor, metric: Metric,
                       patches: Sequence[_Patch]) -> tuple[float, list[float]]:
    """First-order patched metrics of every patch from one forward and one backward of the base run."""
    keys = sorted({patch.site.cache_key for patch in patches})
    kept: dict[tuple[int, str], torch.Tensor] = {}
    with torch.enable_grad():
        # A leaf at the embeddings makes every activation differentiable even when the weights are frozen.
        embeds = model.get_input_embeddings()(base_ids).detach().requires_grad_(True)
        out = patched_forward(model, {key: keeper(kept, key, lambda a: a) for key in keys}, inputs_embeds=embeds)
        value = metric.compute(out.logits, out.residual)[0]
        if not value.requires_grad:
            raise SafeneuronsError("attribution needs a metric that is differentiable in the activations: "
                                   "metric_fn must return a torch scalar computed from the logits, not a float")
        grads = torch.autograd.grad(value, [kept[key] for key in keys], allow_unused=True)
    gradient = {key: torch.zeros_like(kept[key]) if grad is None else grad for key, grad in zip(keys, grads)}
    base_metric = float(value.detach())
    estimates = []
    for patch in patches:
        key = patch.site.cache_key
        base = kept[key][0, patch.base_tokens, patch.columns].detach()
        slope = gradient[key][0, patch.base_tokens, patch.columns]
        estimates.append(base_metric + float(((patch.source_value.to(slope.dtype) - base) * slope).float().sum()))
    return base_metric, estimates


def batch_for(row_bytes: int, budget: int) -> int:
    """Patched rows per forward pass whose working set fits `budget`: at least 1, at most MAX_AUTO_BATCH."""
    return int(min(max(budget // max(row_bytes, 1), 1), MAX_AUTO_BATCH))


def auto_batch_size(model: nn.Module, length: int) -> int:
    """Patched runs per forward pass that fit ACTIVATION_MEMORY_BUDGET (a quarter of free GPU memory on GPU)."""
    config = model.config
    row = forward_row_bytes(config.hidden_size, config.intermediate_size, config.num_attention_heads, length,
                            next(model.parameters()).element_size(), config._attn_implementation == "eager")
    budget = ACTIVATION_MEMORY_BUDGET
    device = model_device(model)
    if device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] // 4
    return batch_for(row, budget)


def as_input_ids(ids: Any, device: torch.device, what: str) -> torch.Tensor:
    tensor = torch.as_tensor(ids, dtype=torch.long)
    if tensor.dim() == 1:
        tensor = tensor[None]
    if tensor.dim() != 2 or tensor.shape[0] != 1 or tensor.shape[1] == 0:
        raise SafeneuronsError(f"{what} input ids have shape {tuple(tensor.shape)}; expected one prompt, [tokens] "
                               f"or [1, tokens]")
    return tensor.to(device)
