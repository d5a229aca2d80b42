"""Activation patching (`patch --shard layers`) on a layer-sharded model (models.blocks).

The source run and the base run flow through the stages once each; every stage caches its own layers' source
activations and the base run's inputs of its layers. A batch of patches of one layer l (batched as on one rank)
starts on the stage that holds l, from the base run's input of l; the stages above run their blocks on it and
the last stage computes the metric; the stages below take no part. Attribution: one pipelined forward and
backward of the base run (the gradients passed back stage to stage), each stage estimating its own sites.
Replicas split the batches; the values come to every rank.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from safeneurons.interp.patching.batches import _Patch, _write_rows, site_columns, token_slices
from safeneurons.interp.patching.hooks import (RunOutput, keep_final_residual, keeper, record_layer_inputs,
                                               site_edits)
from safeneurons.models.hooks import site_point
from safeneurons.runtime import distributed
from safeneurons.runtime.pipeline import StageLink

if TYPE_CHECKING:
    from safeneurons.interp.patching.metrics import Metric
    from safeneurons.interp.patching.sites import Edit, PatchingSite
    from safeneurons.models.blocks import LayerBlock
    from safeneurons.models.hooks import SiteKey


def sharded_patch_values(block: LayerBlock, metric: Metric, sites: Sequence[PatchingSite], base_ids: torch.Tensor,
                         source_ids: torch.Tensor, source_block: LayerBlock, method: str,
                         batch_size: int) -> tuple[float, float, list[float]]:
    """Collective: the base run's and the source run's metric and every site's patched metric (exact, or the
    first-order estimate), on every rank."""
    slices = [token_slices(site.position, base_ids.shape[1], source_ids.shape[1]) for site in sites]
    columns = [site_columns(block.model, site) for site in sites]  # every rank checks every site
    held = [index for index, site in enumerate(sites) if block.split.stage_of(site.layer) == block.stage]
    keys = sorted({sites[index].cache_key for index in held})
    for key in keys:
        site_point(block.model, *key)
    link = block.link()
    try:
        cache: dict[SiteKey, torch.Tensor] = {}
        source = _stage_pass(source_block, link, {key: keeper(cache, key, lambda a: a[0].detach()) for key in keys},
                             source_ids)
        patches = {index: _Patch(sites[index], slices[index][0], columns[index],
                                 cache[sites[index].cache_key][slices[index][1], columns[index]]) for index in held}
        if method == "exact":
            base_metric, values = _exact(block, link, metric, sites, patches, base_ids, batch_size)
        else:
            base_metric, values = _attribution(block, link, metric, patches, base_ids)
    finally:
        link.finish()
    source_metric = None if source is None else float(metric.compute(source.logits, source.residual)[0])
    parts = distributed.all_gather((source_metric, base_metric, values))
    source_metric = next(part[0] for part in parts if part[0] is not None)
    base_metric = next(part[1] for part in parts if part[1] is not None)
    merged = {index: value for part in parts for index, value in part[2].items()}
    if method != "exact":  # the estimates are base metric + Σ (source − base) · gradient
        merged = {index: base_metric + delta for index, delta in merged.items()}
    return base_metric, source_metric, [merged[index] for index in range(len(sites))]


def _stage_pass(block: LayerBlock, link: StageLink, edits: dict[SiteKey, Edit], tokens: torch.Tensor,
                start_layer: int = 0, entry: torch.Tensor | None = None,
                entries: dict[int, torch.Tensor] | None = None) -> RunOutput | None:
    """This stage's part of one pass of `tokens` (rows × length) with `edits`, from layer `start_layer` (its
    input `entry` on the stage that holds it): the last stage's last-position logits and final residual, else
    None. `entries` collects the inputs of this stage's layers."""
    owner = block.split.stage_of(start_layer)
    if block.stage < owner:
        return None
    start, received = None, None
    if block.stage == owner and start_layer > 0:
        start, received = start_layer, entry
    else:
        received = block.receive(link, tokens.shape)
    hooks, final = site_edits(block.model, edits), {}
    if block.last:
        keep_final_residual(block.model, hooks, final)
    if entries is not None:
        record_layer_inputs(hooks, {layer: block.model.model.layers[layer] for layer in block.layers}, entries)
    with hooks, torch.no_grad():
        output = block.run(tokens, received, start=start, use_cache=False, logits_to_keep=1)
    if not block.last:
        link.send_activation(output)
        return None
    return RunOutput(output[:, -1], final["residual"])


def patch_batches(sites: Sequence[PatchingSite], replica: int, replicas: int, batch_size: int) -> list[list[int]]:
    """This replica's batches: its share of the sites (round robin), by layer, at most `batch_size` of one layer
    per batch — the batches one rank of a data-parallel run makes (`map_over_ranks`)."""
    return distributed.grouped_batches(distributed.assign_round_robin(len(sites), replica, replicas), batch_size,
                                       [site.layer for site in sites])


def _exact(block: LayerBlock, link: StageLink, metric: Metric, sites: Sequence[PatchingSite],
           patches: dict[int, _Patch], base_ids: torch.Tensor, batch_size: int) -> tuple[float | None, dict]:
    entries: dict[int, torch.Tensor] = {}
    base = _stage_pass(block, link, {}, base_ids, entries=entries)
    values: dict[int, float] = {}
    for batch in distributed.progress(patch_batches(sites, block.replica, block.replicas, batch_size),
                                      desc="patching", unit="batch", leave=False):
        layer = sites[batch[0]].layer
        edits, entry = {}, None
        if block.split.stage_of(layer) == block.stage:
            rows: dict[SiteKey, list[tuple[int, _Patch]]] = {}
            for row, index in enumerate(batch):  # row r of the pass is the base run with patch r
                rows.setdefault(sites[index].cache_key, []).append((row, patches[index]))
            edits = {key: _write_rows(patches_of_key) for key, patches_of_key in rows.items()}
            entry = entries[layer].expand(len(batch), -1, -1)
        out = _stage_pass(block, link, edits, base_ids.expand(len(batch), -1), layer, entry)
        if out is not None:
            values.update(zip(batch, metric.compute(out.logits, out.residual).tolist()))
    return None if base is None else float(metric.compute(base.logits, base.residual)[0]), values


def _attribution(block: LayerBlock, link: StageLink, metric: Metric, patches: dict[int, _Patch],
                 base_ids: torch.Tensor) -> tuple[float | None, dict]:
    """One pipelined forward and backward of the base run: Σ (source − base) · ∂metric/∂activation per patch."""
    keys = sorted({patch.site.cache_key for patch in patches.values()})
    kept: dict[SiteKey, torch.Tensor] = {}
    hooks, final = site_edits(block.model, {key: keeper(kept, key, lambda a: a) for key in keys}), {}
    if block.last:
        keep_final_residual(block.model, hooks, final)
    with torch.enable_grad():
        if block.first:  # a leaf at the embeddings makes every activation differentiable, weights frozen or not
            received = block.model.get_input_embeddings()(base_ids).detach().requires_grad_(True)
        else:
            received = block.receive(link, base_ids.shape).requires_grad_(True)
        with hooks:
            output = block.run(base_ids, received, use_cache=False, logits_to_keep=1)
        base_metric, problem = None, ""
        if block.last:
            value = metric.compute(output[:, -1], final["residual"])[0]
            base_metric = float(value.detach())
            if not value.requires_grad:
                problem = ("attribution needs a metric that is differentiable in the activations: metric_fn must "
                           "return a torch scalar computed from the logits, not a float")
            output, gradient = (value, None) if value.requires_grad else (None, None)
        else:
            link.send_activation(output)
            gradient = link.receive_gradient(tuple(output.shape), output.dtype)
        wanted = [kept[key] for key in keys] + ([] if block.first else [received])
        grads = torch.autograd.grad(output, wanted, gradient, allow_unused=True) if output is not None and wanted \
            else [None] * len(wanted)
    if not block.first:
        link.send_gradient(torch.zeros_like(received) if grads[-1] is None else grads[-1])
    distributed.all_ranks_ok(not problem, problem)
    slopes = {key: torch.zeros_like(kept[key]) if grad is None else grad for key, grad in zip(keys, grads)}
    deltas = {}
    for index, patch in patches.items():
        key = patch.site.cache_key
        base = kept[key][0, patch.base_tokens, patch.columns].detach()
        slope = slopes[key][0, patch.base_tokens, patch.columns]
        deltas[index] = float(((patch.source_value.to(slope.dtype) - base) * slope).float().sum())
    return base_metric, deltas
