"""Lineage tracing (`trace --shard layers`) on layer-sharded models (models.blocks).

Each model in turn: every rank loads its block of layers, its replica's contiguous chunk of the token batches
flows through the stages, and each stage records its own layers' gate and up outputs. Layer i of the base is
matched with layer i of the other on the stage that holds both (the two models split alike), so no activation
crosses a stage; with replicas, a stage's pairs are dealt to its replicas and each layer's chunks gathered, in
token order, on the replica that matches it.
"""
from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Any, Sequence

import torch

from safeneurons.errors import SafeneuronsError
from safeneurons.interp.tracing.activations import (ActivationRecorder, MlpActivations, allocate_arrays,
                                                    gather_in_token_order, token_chunk)
from safeneurons.interp.tracing.assignment import KINDS
from safeneurons.models.blocks import block_of, checkpoint_split, load_source
from safeneurons.models.hooks import output_width, site_point
from safeneurons.runtime import distributed
from safeneurons.runtime.distributed import collective_device
from safeneurons.runtime.pipeline import pipeline_layout

if TYPE_CHECKING:
    from safeneurons.interp.tracing.config import TraceConfig
    from safeneurons.models.blocks import LayerBlock
    from safeneurons.models.hooks import SiteKey

Pair = tuple[int, int]


def check_sharded_trace(config: TraceConfig) -> None:
    """Before any weight: layer-by-layer pairs of two models that split alike over the stages."""
    if config.all_layers:
        raise SafeneuronsError("--all-layers with --shard layers: most pairs' layers sit on different stages; run it "
                               "unsharded or under --deepspeed")
    _, stages, _, _ = pipeline_layout(config.base.stages)
    splits = [checkpoint_split(source.name, stages, source.cache_dir)[2] for source in (config.base, config.other)]
    if splits[0].starts != splits[1].starts:
        raise SafeneuronsError(f"--shard layers: {config.base.name} splits into layers {splits[0].starts} and "
                               f"{config.other.name} into {splits[1].starts}; layer-by-layer matching needs both "
                               f"layers of a pair on one stage")


def sharded_activations(config: TraceConfig, pairs: Sequence[Pair], batches: Sequence[dict[str, torch.Tensor]],
                        device: torch.device, memory_limit: float) -> tuple[MlpActivations, MlpActivations, list[Pair]]:
    """Collective: both models' activations of the layers this rank matches, over all tokens, and its pairs."""
    base, mine = _model_activations(config.base, device, pairs, batches, memory_limit, config.spill_dir)
    other, _ = _model_activations(config.other, device, pairs, batches, max(memory_limit - base.nbytes, 0),
                                  config.spill_dir)
    return base, other, mine


def _model_activations(source: Any, device: torch.device, pairs: Sequence[Pair],
                       batches: Sequence[dict[str, torch.Tensor]], memory_limit: float,
                       spill_dir: str | None) -> tuple[MlpActivations, list[Pair]]:
    loaded = load_source(source, device)
    block = block_of(loaded.model)
    try:
        chunks = [token_chunk(len(batches), replica, block.replicas) for replica in range(block.replicas)]
        counts = [sum(int(batches[index]["attention_mask"].sum()) for index in chunk) for chunk in chunks]
        local = _record_block(block, [batches[index] for index in chunks[block.replica]], memory_limit, spill_dir)
        held = [pair for pair in pairs if block.split.stage_of(pair[0]) == block.stage]
        owners = {pair: (index % block.replicas) * block.split.stages + block.stage for index, pair in enumerate(held)}
        mine = [pair for pair in held if owners[pair] == distributed.rank()]
        if block.replicas == 1:
            return local, mine
        needed: dict[SiteKey, set[int]] = {(pair[0], kind): {owners[pair]} for pair in held for kind in KINDS}
        widths = {key: output_width(site_point(block.model, *key)) for key in needed}
        return gather_in_token_order(local, needed, widths, counts, block.replica, collective_device(device),
                                     memory_limit, spill_dir, group=block.group), mine
    finally:
        del loaded, block
        gc.collect()


@torch.no_grad()
def _record_block(block: LayerBlock, batches: Sequence[dict[str, torch.Tensor]], memory_limit: float,
                  spill_dir: str | None) -> MlpActivations:
    """The batches pipelined through the stages; this stage's layers' gate and up outputs over their tokens."""
    points = {(layer, kind): site_point(block.model, layer, kind) for layer in block.layers for kind in KINDS}
    n_tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    arrays, spill = allocate_arrays({key: (n_tokens, output_width(point)) for key, point in points.items()},
                              memory_limit, spill_dir)
    link = block.link()
    try:
        with ActivationRecorder(points, arrays) as recorder:
            for batch in distributed.progress(batches, desc="tracing forwards", unit="batch", leave=False):
                ids, mask = batch["input_ids"].to(block.device), batch["attention_mask"].to(block.device)
                recorder.keep = mask.reshape(-1).bool()
                received = block.receive(link, ids.shape)
                output = block.run(ids, received, head=False, attention_mask=mask, use_cache=False)
                if not block.last:
                    link.send_activation(output)
                recorder.offset += int(mask.sum())
    finally:
        link.finish()
    return MlpActivations.from_arrays(arrays, n_tokens, spill)
