"""The two schedules (all layers from one set of passes; the original's layer by layer with
earlier selections zeroed), `score_model` and the summary.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import nn

from safeneurons.data.samples import load_samples
from safeneurons.models.blocks import block_of
from safeneurons.models.structure import decoder_layers, fused_parts, model_device
from safeneurons.runtime import distributed
from safeneurons.runtime.zero3 import is_zero3_partitioned, stored_copies
from safeneurons.scores.config import ScoreResult, check_granularity, mask_on_every_rank, targets_of
from safeneurons.scores.passes import ROUTED_TOKENS, next_entries, rank_batches, routed_tokens_key
from safeneurons.scores.selection import expert_scores, select_masks
from safeneurons.scores.statistics import score_targets

if TYPE_CHECKING:
    from safeneurons.data.examples import Sample
    from safeneurons.scores.config import ScoreConfig, Target
    from safeneurons.scores.passes import Entry

log = logging.getLogger(__name__)

def score_all_layers(model: nn.Module, targets: Sequence[Target], sources: Mapping[str, list[Sample] | None],
                     config: ScoreConfig, entries: Mapping[str, Sequence[Entry]] | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every layer from the same passes (one backward per sample), nothing pruned in between; `entries` per
    source start the passes at the lowest scored layer; on a layer-sharded model the passes are pipelined."""
    scores = {source: score_targets(model, targets, samples, config, stream, (entries or {}).get(source))
              for stream, (source, samples) in enumerate(sources.items())}
    return select_masks(targets, scores, config, attention_heads(model), model.config), scores["safety"]


def attention_heads(model: nn.Module) -> tuple[int, int]:
    """(query heads, key/value heads) of the model's attention (they differ under GQA)."""
    heads = int(model.config.num_attention_heads)
    return heads, int(getattr(model.config, "num_key_value_heads", None) or heads)


def score_layer_by_layer(model: nn.Module, targets: Sequence[Target], sources: Mapping[str, list[Sample] | None],
                         config: ScoreConfig) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The original schedule: layer i is scored on the model whose layers < i have their selected weights zeroed.
    The weights are restored afterwards. Each layer's passes start at that layer, from the hidden states that
    enter it (kept per micro-batch, advanced by one layer after each layer is pruned), so the layers below are not
    run again for every layer; under ZeRO-3, whose hooks follow the module order, every pass starts at the
    embeddings; on a layer-sharded model every layer's passes run the whole pipeline, and the ranks that hold a
    layer (its stage in every replica) zero its selection."""
    from safeneurons.masks.apply import zero_masked
    from safeneurons.masks.source import MaskElements

    block = block_of(model)
    saved = [(stored, stored.clone()) for target in targets for stored in stored_copies(target.weight)]
    masks: dict[str, torch.Tensor] = {}
    safety_scores: dict[str, torch.Tensor] = {}
    cached = config.method != "random" and not is_zero3_partitioned(targets[0].linear.module) and block is None
    batches = {source: rank_batches(samples, config.batch_size, model_device(model))
               for source, samples in sources.items() if samples is not None} if cached else {}
    entries: dict[str, list[Entry] | None] = {source: None for source in batches}
    try:
        for layer in sorted({target.linear.layer for target in targets}):
            layer_targets = [target for target in targets if target.linear.layer == layer]
            starts = {source: found for source, found in entries.items() if found is not None}
            layer_masks, layer_scores = score_all_layers(model, layer_targets, sources, config, starts)
            for target in layer_targets:
                mask = mask_on_every_rank(layer_masks.get(target.name), target,
                                          model_device(model) if block is None else block.device)
                if target.weight.device.type != "meta":  # a layer-sharded rank zeroes only the layers it holds
                    zero_masked(target.name, target.weight, MaskElements({target.name: mask}))
            masks.update(layer_masks)
            safety_scores.update(layer_scores)
            if layer + 1 < len(decoder_layers(model)):
                entries = {source: next_entries(model, batches[source], entries[source], layer)
                           for source in batches}
    finally:
        for stored, original in saved:
            stored.copy_(original)
    return masks, safety_scores


# ---------------------------------------------------------------- the API

def load_sources(tokenizer: Any, config: ScoreConfig) -> dict[str, list[Sample] | None]:
    """The safety samples (and utility samples for the set difference); random needs none."""
    def samples(source: str) -> list[Sample] | None:
        if config.method == "random":
            return None
        return load_samples(source, tokenizer, config.nsamples, config.seed, config.max_length, config.data_dir,
                            config.add_eos)

    sources = {"safety": samples(config.data)}
    if config.set_difference:
        sources["utility"] = samples(config.utility_source)
    return sources


def score_model(model: nn.Module, tokenizer: Any, config: ScoreConfig) -> ScoreResult:
    """Score and select. Collective under N ranks (every rank calls it); under ZeRO-3 pass the module that
    DeepSpeed's engine hooks (`engine.module`, see `models.load_for_inference`); layer-sharded, this rank's
    block's model (`models.blocks.load_source`)."""
    config.validate()
    check_granularity(model, config)
    targets = targets_of(model)
    sources = load_sources(tokenizer, config)
    schedule = score_layer_by_layer if config.sequential else score_all_layers
    masks, scores = schedule(model, targets, sources, config)
    routed = {key: scores.pop(key) for key in [key for key in scores if key.endswith(ROUTED_TOKENS)]}
    summary = build_summary(targets, masks, sources, config, routed, scores)
    block = block_of(model)
    if block is not None:
        summary["layer_split"] = block.split.to_json()
    return ScoreResult(masks, scores if config.keep_scores else None, summary)


def build_summary(targets: Sequence[Target], masks: Mapping[str, torch.Tensor],
                  sources: Mapping[str, list[Sample] | None], config: ScoreConfig,
                  routed: Mapping[str, torch.Tensor] | None = None,
                  scores: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Counts per parameter and per layer, and per expert of an MoE layer (selected weights, response tokens
    received, summed safety score), merged on rank 0 (the other ranks get the settings only)."""
    settings = {key: value for key, value in asdict(config).items() if key not in ("keep_scores", "data_dir")}
    if not config.set_difference:
        settings["utility_data"] = None
    summary: dict[str, Any] = {**settings, "world_size": distributed.world_size(),
                               "zero3_partitioned": is_zero3_partitioned(targets[0].linear.module),
                               "nsamples_used": {name: None if samples is None else len(samples)
                                                 for name, samples in sources.items()}}
    routed, scores = routed or {}, scores or {}
    local = {target.name: (target.linear.layer, int(masks[target.name].sum()), math.prod(target.shape),
                           list(target.shape), _part_counts(target, masks[target.name], config_of(target)),
                           _expert_counts(target, masks[target.name], routed.get(routed_tokens_key(target.name)),
                                          scores.get(target.name)))
             for target in targets if target.mine}
    merged = distributed.merge_dicts_to_main(local)
    if merged is None:
        return summary
    per_parameter = {target.name: dict(zip(("layer", "selected", "total", "shape", "parts", "experts"),
                                           merged[target.name])) for target in targets}
    for counts in per_parameter.values():
        for optional in ("parts", "experts"):
            if counts[optional] is None:
                del counts[optional]
    per_layer: dict[str, dict[str, int]] = {}
    for counts in per_parameter.values():
        layer = per_layer.setdefault(str(counts["layer"]), {"selected": 0, "total": 0})
        layer["selected"] += counts["selected"]
        layer["total"] += counts["total"]
    total_selected = sum(counts["selected"] for counts in per_parameter.values())
    total_scored = sum(counts["total"] for counts in per_parameter.values())
    experts = experts_summary(per_parameter)
    return {**summary, "total_selected": total_selected, "total_scored": total_scored,
            "selected_fraction": total_selected / total_scored, "per_layer": per_layer,
            **({"experts": experts} if experts else {}), "per_parameter": per_parameter}


def _expert_counts(target: Target, mask: torch.Tensor, tokens: torch.Tensor | None,
                   scores: torch.Tensor | None) -> dict[str, list] | None:
    """Per expert of an experts' matrix: its selected weights, its summed safety score, and (gate_up, scored on
    data) the response tokens routed to it."""
    if target.linear.experts is None:
        return None
    counts: dict[str, list] = {"selected": mask.reshape(target.linear.experts.num_experts, -1).sum(dim=1).tolist()}
    if scores is not None:
        counts["score"] = expert_scores(target, scores.double()).tolist()
    if tokens is not None:
        counts["response_tokens"] = tokens.tolist()
    return counts


def experts_summary(per_parameter: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per MoE layer: the selected weights of each expert (both matrices), each expert's share of the layer's
    experts' safety score, the response tokens each received, and the experts that received none (their data
    statistics are zero: reported, not hidden)."""
    layers: dict[str, dict[str, Any]] = {}
    for counts in per_parameter.values():
        if "experts" not in counts:
            continue
        experts = len(counts["experts"]["selected"])
        layer = layers.setdefault(str(counts["layer"]), {"selected": [0] * experts, "score": [0.0] * experts})
        layer["selected"] = [a + b for a, b in zip(layer["selected"], counts["experts"]["selected"])]
        layer["score"] = [a + b for a, b in zip(layer["score"], counts["experts"].get("score", [0.0] * experts))]
        if "response_tokens" in counts["experts"]:
            tokens = counts["experts"]["response_tokens"]
            layer["response_tokens"] = tokens
            layer["without_tokens"] = [expert for expert, count in enumerate(tokens) if count == 0]
    for number, layer in layers.items():
        scores = layer.pop("score")
        if sum(scores) > 0:  # (random scores and counts-only summaries have none)
            layer["score_share"] = [round(score / sum(scores), 6) for score in scores]
        if layer.get("without_tokens"):
            log.warning("layer %s: experts %s received no response token of the safety data; their wanda/wandg "
                        "statistics are zero", number, layer["without_tokens"])
    return layers


def config_of(target: Target) -> Any:
    return getattr(target.linear, "config", None)


def _part_counts(target: Target, mask: torch.Tensor, config: Any) -> dict[str, dict[str, int]] | None:
    """Selected and total weights of each part of a fused projection (q/k/v, gate/up)."""
    parts = fused_parts(target.linear.name, config) if config is not None else None
    if parts is None:
        return None
    return {part: {"selected": int(mask[rows].sum()), "total": int(mask[rows].numel())} for part, rows in parts.items()}
