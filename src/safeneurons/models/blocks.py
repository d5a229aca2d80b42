"""Layer sharding (`--shard layers`): each rank holds one contiguous block of decoder layers, read from the
safetensors files directly; the first block also holds the embeddings, the last the final norm and `lm_head`.

The split balances the parameters a rank holds (the embeddings and the head count towards the first and the last
block), read from the file headers only. A rank's model is the architecture built on the meta device with its own
block's tensors loaded into it: the other layers never take memory.
"""
from __future__ import annotations

import copy
import functools
import inspect
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from safeneurons.errors import SafeneuronsError
from safeneurons.models.layer_split import LayerSplit, balanced_split
from safeneurons.models.loading import (LoadedModel, ModelSource, load_config, load_tokenizer, local_model_folder,
                                        model_skeleton, parse_dtype)
from safeneurons.models.structure import layers_from
from safeneurons.runtime.checkpoints import CheckpointFiles
from safeneurons.runtime.pipeline import StageLink, pipeline_layout, replica_group

LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
FIRST_PREFIXES = ("model.embed_tokens.",)
LAST_PREFIXES = ("model.norm.", "lm_head.")
# Architectures whose forward rescales `inputs_embeds` (Gemma's √hidden): the hidden states a block receives would
# be scaled a second time, so they are not sharded.
SCALED_EMBEDDINGS = ("gemma", "gemma2", "gemma3_text")
# `--shard auto`: a whole model must leave half of a rank's free memory to activations, KV caches and statistics
AUTO_WEIGHT_FRACTION = 0.5
BLOCK_ATTRIBUTE = "safeneurons_layer_block"  # on a block's model: the LayerBlock (see block_of)


def split_from_headers(metadata: dict[str, tuple[tuple[int, ...], str]], num_layers: int, tied: bool,
                       stages: int) -> LayerSplit:
    """The balanced split of a checkpoint from its tensors' shapes (a tied head counts as a copy of the
    embeddings on the last stage)."""
    layer_params = [0] * num_layers
    first = last = 0
    for name, (shape, _dtype) in metadata.items():
        count = math.prod(shape)
        found = LAYER_KEY.match(name)
        if found:
            layer_params[int(found.group(1))] += count
        elif name.startswith(FIRST_PREFIXES):
            first += count
            last += count if tied and "lm_head.weight" not in metadata else 0
        elif name.startswith(LAST_PREFIXES):
            last += count
    return balanced_split(layer_params, first, last, stages)


@dataclass
class LayerBlock:
    """One rank's part of a layer-sharded model: the model (its block loaded, the rest on the meta device) and its
    place in the stages × replicas."""

    model: nn.Module
    split: LayerSplit
    stage: int
    device: torch.device
    dtype: torch.dtype
    replica: int = 0  # which of the `replicas` pipelines this rank is in (rank = replica × stages + stage)
    replicas: int = 1
    group: Any = None  # this stage's ranks across the replicas (runtime.pipeline.replica_group)

    @property
    def first_rank(self) -> int:
        return self.replica * self.split.stages

    @property
    def layers(self) -> range:
        return self.split.block(self.stage)

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.split.stages - 1

    def link(self) -> StageLink:
        """This rank's sends and receives within its replica's pipeline."""
        return StageLink(self.stage, self.split.stages, self.device, self.first_rank)

    def receive(self, link: StageLink, tokens_shape: Sequence[int]) -> torch.Tensor | None:
        """The hidden states entering this block for tokens of `tokens_shape`, from the stage below (None on the
        first stage, which embeds the tokens itself)."""
        if self.first:
            return None
        return link.receive_activation((*tokens_shape, self.model.config.hidden_size), self.dtype)

    @functools.cached_property
    def cache_argument(self) -> str:
        """The forward's KV-cache argument: `cache` from transformers 5, `past_key_values` before."""
        return "cache" if "cache" in inspect.signature(self.model.model.forward).parameters else "past_key_values"

    def new_cache(self) -> Any:
        """An empty KV cache for this block's layers alone (their attention modules count from 0, see
        `load_block`), so that its length and masks are those of the block's first layer."""
        from transformers import DynamicCache

        config = copy.deepcopy(self.model.config)
        config.num_hidden_layers = len(self.layers)
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[self.layers.start:self.layers.stop]
        return DynamicCache(config=config)

    def run(self, tokens: torch.Tensor, received: torch.Tensor | None, head: bool = True, start: int | None = None,
            **kwargs: Any) -> torch.Tensor:
        """This block's layers (from layer `start` of it) on the tokens (first stage) or the hidden states
        received (entering the first layer run): the logits on the last stage (its final hidden states without
        the `head`), the hidden states to pass on elsewhere. `kwargs` go to the model's forward (attention mask,
        positions, `cache`: a `new_cache()`)."""
        inputs = {"input_ids": tokens} if received is None else {"inputs_embeds": received}
        if "cache" in kwargs:
            kwargs[self.cache_argument] = kwargs.pop("cache")
        with layers_from(self.model, self.layers.start if start is None else start, self.layers.stop):
            if self.last and head:
                return self.model(**inputs, **kwargs).logits
            kwargs.pop("logits_to_keep", None)
            return self.model.model(**inputs, **kwargs).last_hidden_state


def block_of(model: nn.Module) -> LayerBlock | None:
    """The layer block `model` is one rank's part of (None: a whole or ZeRO-3-partitioned model)."""
    return getattr(model, BLOCK_ATTRIBUTE, None)


def check_shardable(config: Any, name: str) -> None:
    if getattr(config, "model_type", None) in SCALED_EMBEDDINGS:
        raise SafeneuronsError(f"--shard layers: {name} is {config.model_type}, whose forward rescales the hidden "
                               f"states a block receives; run it unsharded (or under --deepspeed)")


def shardable_checkpoint(name: str, cache_dir: str | None = None) -> tuple[Any, CheckpointFiles]:
    """The model's config and its safetensors files, refused when the model cannot be layer-sharded."""
    config = load_config(name, cache_dir)
    check_shardable(config, name)
    return config, CheckpointFiles(Path(local_model_folder(name, cache_dir)))


def checkpoint_split(name: str, stages: int, cache_dir: str | None = None) -> tuple[Any, CheckpointFiles, LayerSplit]:
    """The model's config, its safetensors files and their balanced split over `stages`, from the headers."""
    config, files = shardable_checkpoint(name, cache_dir)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return config, files, split_from_headers(files.metadata(), config.num_hidden_layers, tied, stages)


def load_block(name: str, stage: int, stages: int, dtype: torch.dtype, device: torch.device,
               cache_dir: str | None = None) -> LayerBlock:
    """Stage `stage` of `stages`: the model skeleton with only its block's tensors read from the safetensors."""
    config, files, split = checkpoint_split(name, stages, cache_dir)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    model = model_skeleton(name, cache_dir)
    block = LayerBlock(model, split, stage, device, dtype)
    wanted = [key for key in model.state_dict() if _belongs(key, block)]
    missing = [key for key in wanted if key not in files.weight_map and not (tied and key == "lm_head.weight")]
    if missing:
        raise SafeneuronsError(f"--shard layers: {files.folder} has no tensor {missing[0]!r}")
    state = {key: files.get(key).to(device=device, dtype=dtype) for key in wanted if key in files.weight_map}
    if block.last and tied and "lm_head.weight" not in state:
        state["lm_head.weight"] = files.get("model.embed_tokens.weight").to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=False, assign=True)  # a tied head gets its own copy: the embeddings stay
    inner = model.model
    inner.rotary_emb = type(inner.rotary_emb)(config=model.config).to(device)  # its buffers are not in the files
    if not block.last:
        inner.norm = nn.Identity()  # the block's output is the next block's input, not normalised
    for local, layer in enumerate(block.layers):  # the block's own KV cache holds its layers from index 0
        inner.layers[layer].self_attn.layer_idx = local
    setattr(model, BLOCK_ATTRIBUTE, block)
    model.eval()
    return block


def _belongs(key: str, block: LayerBlock) -> bool:
    found = LAYER_KEY.match(key)
    if found:
        return int(found.group(1)) in block.layers
    return (block.first and key.startswith(FIRST_PREFIXES)) or (block.last and key.startswith(LAST_PREFIXES))


def needs_layer_sharding(name: str, dtype: str, device: torch.device, cache_dir: str | None = None) -> str:
    """Collective: why `--shard auto` holds the model layer-sharded (its weights, from the file headers, above
    AUTO_WEIGHT_FRACTION of some rank's free memory), or "" when a whole model fits every rank or the model
    cannot be sharded (no safetensors, an architecture `check_shardable` refuses)."""
    from safeneurons.runtime import distributed

    try:
        _, files = shardable_checkpoint(name, cache_dir)
        weights = sum(math.prod(shape) for shape, _ in files.metadata().values()) * parse_dtype(dtype).itemsize
    except SafeneuronsError:
        weights = 0
    free = min(distributed.all_gather(distributed.available_memory(device)))
    if weights <= AUTO_WEIGHT_FRACTION * free:
        return ""
    return f"its weights take {weights / 2 ** 30:.1f} GiB, more than half of a rank's {free / 2 ** 30:.1f} GiB free"


def load_source(source: ModelSource, device: torch.device | None = None) -> LoadedModel:
    """Collective: the model as `source` holds it — this rank's block of a layer-sharded model (its place in the
    stages × replicas from `source.stages`; `block_of(model)` gives it), or `source.load` whole or partitioned."""
    if source.shard != "layers":
        return source.load(device)
    stage, stages, replica, replicas = pipeline_layout(source.stages)
    block = load_block(source.name, stage, stages, parse_dtype(source.dtype), device or torch.device("cpu"),
                       source.cache_dir)
    block.replica, block.replicas = replica, replicas
    block.group = replica_group(stages, replicas)
    return LoadedModel(block.model, load_tokenizer(source.name, source.cache_dir))


def save_blocks(block: LayerBlock, tokenizer: Any, out: str | Path, json_files: dict[str, Any] | None = None) -> None:
    """Collective: a layer-sharded model as an HF folder that `from_pretrained` loads — each stage's block one
    safetensors shard (written by the stage's rank in replica 0), rank 0 the config, tokenizer, index and
    `json_files` (name -> payload) — staged and then moved into place."""
    from safetensors.torch import save_file

    from safeneurons.runtime import distributed
    from safeneurons.runtime.outputs import discard_staging, publish_dir, staging_dir, write_json

    final = Path(out)
    if distributed.is_main():
        discard_staging(final)
    distributed.barrier()
    staging = staging_dir(final)
    shard = f"model-{block.stage + 1:05d}-of-{block.split.stages:05d}.safetensors"
    tensors = {} if block.replica else _held_tensors(block)
    problem = ""
    try:
        if tensors:
            save_file(tensors, str(staging / shard), metadata={"format": "pt"})
        if distributed.is_main():
            block.model.config.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            for name, payload in (json_files or {}).items():
                write_json(staging / name, payload)
    except OSError as error:
        problem = f"cannot write the model to {out}: {error}"
    distributed.all_ranks_ok(not problem, problem)
    parts = distributed.gather_to_main({name: (shard, tensor.nbytes) for name, tensor in tensors.items()})
    if parts is not None:
        held = {name: entry for part in parts for name, entry in part.items()}
        write_json(staging / "model.safetensors.index.json", {
            "metadata": {"total_size": sum(size for _, size in held.values())},
            "weight_map": {name: file for name, (file, _) in sorted(held.items())}})
        publish_dir(final)
    distributed.barrier()


def _held_tensors(block: LayerBlock) -> dict[str, torch.Tensor]:
    """The block's own tensors (a tied head is the embeddings' copy, which the first block writes)."""
    tied = bool(getattr(block.model.config, "tie_word_embeddings", False))
    return {name: tensor.detach().contiguous().cpu() for name, tensor in block.model.state_dict().items()
            if tensor.device.type != "meta" and not (tied and name == "lm_head.weight")}
