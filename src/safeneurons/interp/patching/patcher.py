"""ActivationPatcher: exact and attribution patching of many sites, batched and split across ranks."""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import nn

from safeneurons.errors import SafeneuronsError
from safeneurons.interp.patching.batches import (_Patch, _patched_batch, as_input_ids, attribution_batch,
                                                 auto_batch_size, cache_run, expert_counts, head_count, site_columns,
                                                 token_slices)
from safeneurons.interp.patching.hooks import layer_inputs
from safeneurons.interp.patching.metrics import direction_metric, metric_from_fn, refusal_metric, refusal_token_ids
from safeneurons.interp.patching.report import format_report
from safeneurons.interp.patching.sites import (DEFAULT_SIGNIFICANCE, METHODS, MODES, ActivationPatchingResult,
                                               PatchingEffect, build_sites, normalised_effect)
from safeneurons.interp.patching.sharded import sharded_patch_values
from safeneurons.models.blocks import block_of
from safeneurons.models.hooks import site_point
from safeneurons.models.structure import check_same_structure, decoder_layers, model_device
from safeneurons.runtime.distributed import all_gather, map_over_ranks
from safeneurons.runtime.zero3 import is_zero3_partitioned

if TYPE_CHECKING:
    from safeneurons.interp.patching.metrics import Metric
    from safeneurons.interp.patching.sites import PatchingSite, Position

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- the patcher

class ActivationPatcher:
    """Patch sites of a model between two prompts and measure a metric of the last-position output.

    The original patcher's API: `ActivationPatcher(significance_threshold=0.1, metric_fn=None).patch_sweep(model,
    clean_input_ids, corrupted_input_ids, sites=None, refusal_direction=None, mode="noising")`. The metric is, in
    this order: `metric` (a `Metric`); `metric_fn` (last-position logits [1, vocab] of one run -> float, a
    differentiable torch scalar for attribution); the projection of the final residual (not the logits) on
    `refusal_direction`; else the refusal log-odds, with `tokenizer` or the tokenizer saved with the model.
    `model=` binds a model for `patch` and `sites`."""

    def __init__(self, significance_threshold: float = DEFAULT_SIGNIFICANCE,
                 metric_fn: Callable[[torch.Tensor], Any] | None = None, *, model: nn.Module | None = None,
                 tokenizer: Any = None, metric: Metric | None = None, batch_size: int | None = None) -> None:
        if isinstance(significance_threshold, bool) or not isinstance(significance_threshold, (int, float)) \
                or not significance_threshold >= 0:
            raise SafeneuronsError(f"significance_threshold {significance_threshold!r} must be a number >= 0 (the "
                                   f"model goes to patch_sweep(model, ...) or model=)")
        if batch_size is not None and batch_size < 1:
            raise SafeneuronsError(f"batch size {batch_size} must be a positive integer")
        self.significance_threshold = float(significance_threshold)
        self.metric_fn = metric_fn
        self.model = model
        self.tokenizer = tokenizer
        self.metric = metric
        self.batch_size = batch_size

    def _bound_model(self) -> nn.Module:
        if self.model is None:
            raise SafeneuronsError("this ActivationPatcher has no model: call patch_sweep(model, ...) or build it "
                                   "with ActivationPatcher(model=model)")
        return self.model

    @property
    def n_layers(self) -> int:
        return len(decoder_layers(self._bound_model()))

    @property
    def n_heads(self) -> int:
        return head_count(self._bound_model())

    def sites(self, components: Sequence[str] = ("residual",), layers: Sequence[int] | None = None,
              positions: Sequence[Position] = ("last",),
              neurons: Mapping[int, Sequence[int]] | None = None) -> list[PatchingSite]:
        return build_sites(self.n_layers, self.n_heads, components, layers, positions, neurons,
                           expert_counts(self._bound_model()))

    def resolve_metric(self, model: nn.Module, refusal_direction: torch.Tensor | None = None) -> Metric:
        if self.metric is not None:
            return self.metric
        if self.metric_fn is not None:
            return metric_from_fn(self.metric_fn)
        if refusal_direction is not None:
            return direction_metric(refusal_direction)
        return refusal_metric(refusal_token_ids(self.tokenizer or _saved_tokenizer(model)))

    def patch_sweep(self, model: nn.Module, clean_input_ids: Any, corrupted_input_ids: Any,
                    sites: Sequence[PatchingSite] | None = None, refusal_direction: torch.Tensor | None = None,
                    mode: str = "noising", *, method: str = "exact",
                    source_model: nn.Module | None = None) -> ActivationPatchingResult:
        """Patch every site (default: every layer's residual at the last token) of `model`. With `source_model`
        (a model of the same structure and tokenizer) the source run is that model's, on the source prompt, which
        may be the base prompt itself: cross-model patching."""
        if mode not in MODES:
            raise SafeneuronsError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        if method not in METHODS:
            raise SafeneuronsError(f"method {method!r} is not one of {', '.join(METHODS)}")
        metric = self.resolve_metric(model, refusal_direction)
        block = block_of(model)
        device = model_device(model) if block is None else block.device
        clean = as_input_ids(clean_input_ids, device, "clean")
        corrupted = as_input_ids(corrupted_input_ids, device, "corrupted")
        n_layers = len(decoder_layers(model))
        sites = list(sites) if sites is not None else build_sites(n_layers, head_count(model),
                                                                  experts=expert_counts(model))
        if not sites:
            raise SafeneuronsError("no sites to patch")
        base, source = (corrupted, clean) if mode == "denoising" else (clean, corrupted)
        if source_model is not None:
            check_same_structure(model, source_model)
        if block is not None:
            base_metric, source_metric, patched = sharded_patch_values(
                block, metric, sites, base, source, block_of(source_model or model), method,
                self.batch_size or min(all_gather(auto_batch_size(model, base.shape[1]))))  # one size on every stage
        else:
            base_metric, source_metric, patched = self._values(model, metric, sites, base, source,
                                                               source_model or model, method)
        clean_metric, corrupted_metric = ((source_metric, base_metric) if mode == "denoising"
                                          else (base_metric, source_metric))
        effects = [self._effect(site, value, mode, clean_metric, corrupted_metric)
                   for site, value in zip(sites, patched)]
        if effects and all(math.isnan(effect.effect) for effect in effects):
            log.warning("the clean and corrupted prompts give the same %s metric (%.6g and %.6g): effects are "
                        "undefined (NaN); choose prompts that differ in the metric", metric.name,
                        clean_metric, corrupted_metric)
        return ActivationPatchingResult(mode, method, metric.name, clean_metric, corrupted_metric, effects,
                                        clean.shape[1], corrupted.shape[1], n_layers, self.significance_threshold)

    def _values(self, model: nn.Module, metric: Metric, sites: Sequence[PatchingSite], base: torch.Tensor,
                source: torch.Tensor, source_model: nn.Module, method: str) -> tuple[float, float, list[float]]:
        """The base and source runs' metrics and every site's patched metric, on a model that every rank holds
        (whole or ZeRO-3-partitioned)."""
        patches, source_metric = _patches(model, metric, sites, base.shape[1], source, source_model)
        if method != "exact":
            base_metric, estimates = attribution_batch(model, base, metric, patches)
            return base_metric, source_metric, estimates
        base_metric = cache_run(model, base, [], metric)[1]
        batch_size = self.batch_size or auto_batch_size(model, base.shape[1])
        # under ZeRO-3 every pass runs the whole module order (its parameter hooks follow it)
        entries = None if is_zero3_partitioned(model) else layer_inputs(model, base)
        # a batch starts at its lowest layer: batches of one layer's sites recompute nothing below it
        patched = map_over_ranks(
            len(patches), batch_size,
            lambda batch: _patched_batch(model, base, metric, [patches[i] for i in batch], entries),
            desc="patching", groups=None if entries is None else [patch.site.layer for patch in patches])
        return base_metric, source_metric, patched

    def patch(self, clean_input_ids: Any, corrupted_input_ids: Any, sites: Sequence[PatchingSite] | None = None,
              mode: str = "noising", method: str = "exact",
              source_model: nn.Module | None = None) -> ActivationPatchingResult:
        """`patch_sweep` on the bound model (`model=`)."""
        return self.patch_sweep(self._bound_model(), clean_input_ids, corrupted_input_ids, sites, None, mode,
                                method=method, source_model=source_model)

    def _effect(self, site: PatchingSite, patched: float, mode: str, clean: float, corrupted: float) -> PatchingEffect:
        effect = normalised_effect(mode, patched, clean, corrupted)
        significant = math.isfinite(effect) and abs(effect) > self.significance_threshold
        return PatchingEffect(site, clean, corrupted, patched, effect, significant)

    @staticmethod
    def format_report(result: ActivationPatchingResult, top: int = 15,
                      token_labels: Sequence[str] | None = None) -> str:
        return format_report(result, top, token_labels)


def _saved_tokenizer(model: nn.Module) -> Any:
    """The tokenizer stored with the model's weights (for the default refusal metric)."""
    from transformers import AutoTokenizer

    where = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    try:
        return AutoTokenizer.from_pretrained(where, local_files_only=True)
    except (OSError, ValueError):
        raise SafeneuronsError(f"no metric given and no tokenizer saved with the model ({where or 'no path'!r}) "
                               f"for the refusal metric: pass metric_fn, refusal_direction or tokenizer=") from None


def _patches(model: nn.Module, metric: Metric, sites: Sequence[PatchingSite], base_length: int,
             source: torch.Tensor, source_model: nn.Module) -> tuple[list[_Patch], float]:
    """Each site's base-run token range and features with the source run's activation (of `source_model`), and
    the source run's metric (one cached pass for every layer)."""
    keys = sorted({site.cache_key for site in sites})
    for layer, component in keys:  # an unknown layer fails here, before any forward pass
        site_point(model, layer, component)
    columns = [site_columns(model, site) for site in sites]
    slices = [token_slices(site.position, base_length, source.shape[1]) for site in sites]
    cache, source_metric = cache_run(source_model, source, keys, metric)
    patches = [_Patch(site, base_tokens, cols, cache[site.cache_key][source_tokens, cols])
               for site, cols, (base_tokens, source_tokens) in zip(sites, columns, slices)]
    return patches, source_metric


def patch_sweep(model: nn.Module, clean_input_ids: Any, corrupted_input_ids: Any,
                sites: Sequence[PatchingSite] | None = None, refusal_direction: torch.Tensor | None = None,
                mode: str = "noising", *, metric_fn: Callable[[torch.Tensor], Any] | None = None,
                tokenizer: Any = None, method: str = "exact", batch_size: int | None = None,
                significance_threshold: float = DEFAULT_SIGNIFICANCE) -> ActivationPatchingResult:
    """`ActivationPatcher(...).patch_sweep(...)` in one call."""
    patcher = ActivationPatcher(significance_threshold, metric_fn, tokenizer=tokenizer, batch_size=batch_size)
    return patcher.patch_sweep(model, clean_input_ids, corrupted_input_ids, sites, refusal_direction, mode,
                               method=method)
