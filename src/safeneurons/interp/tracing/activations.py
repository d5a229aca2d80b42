"""MLP activations of one model over shared token batches, recorded by layer."""
from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from safeneurons.errors import SafeneuronsError
from safeneurons.interp.tracing.assignment import DEFAULT_BATCH_SIZE, KINDS
from safeneurons.models.hooks import Hooks, SiteKey, SitePoint, output_width, site_point
from safeneurons.models.structure import decoder_layers, model_device
from safeneurons.runtime import distributed
from safeneurons.runtime.distributed import collective_device, gather_to_owner
from safeneurons.runtime.zero3 import is_zero3_partitioned

if TYPE_CHECKING:
    from safeneurons.interp.tracing.assignment import TokenInputs

log = logging.getLogger(__name__)


@dataclass
class MlpActivations:
    """Per layer, the `mlp.gate_proj` and `mlp.up_proj` outputs of one model on the traced tokens: float32
    [tokens, neurons] (a column per neuron), numpy arrays in memory or memmaps in a spill folder."""

    gate: dict[int, np.ndarray]
    up: dict[int, np.ndarray]
    n_tokens: int
    spill: tempfile.TemporaryDirectory | None = field(default=None, repr=False)  # removed with this object

    @classmethod
    def from_arrays(cls, arrays: Mapping[SiteKey, np.ndarray], n_tokens: int,
                    spill: tempfile.TemporaryDirectory | None) -> "MlpActivations":
        """From arrays keyed by site, (layer, "gate" or "up")."""
        by_kind: dict[str, dict[int, np.ndarray]] = {kind: {} for kind in KINDS}
        for (layer, kind), array in arrays.items():
            by_kind[kind][layer] = array
        return cls(by_kind["gate"], by_kind["up"], n_tokens, spill)

    def get(self, kind: str, layer: int) -> np.ndarray:
        return (self.gate if kind == "gate" else self.up)[layer]

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in (*self.gate.values(), *self.up.values()))


def as_batches(inputs: TokenInputs, batch_size: int = DEFAULT_BATCH_SIZE) -> list[dict[str, torch.Tensor]]:
    """Token inputs as batches with `input_ids` and `attention_mask` (only unmasked positions are traced): a 2-D
    LongTensor [sequences, length] (cut into batches of `batch_size` rows), or an iterable of such tensors or of
    dicts holding `input_ids` and optionally `attention_mask` (for example a DataLoader's batches)."""
    if isinstance(inputs, torch.Tensor):
        inputs = inputs.split(batch_size) if inputs.ndim == 2 else [inputs]
    batches = []
    for item in inputs:
        if isinstance(item, (list, tuple)) and item and isinstance(item[0], torch.Tensor):
            item = item[0]  # a DataLoader over a TensorDataset yields [input_ids] (or [input_ids, labels])
        batch = {"input_ids": item} if isinstance(item, torch.Tensor) else dict(item)
        ids = batch.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
            raise SafeneuronsError("token inputs must be 2-D tensors of token ids [sequences, length] or dicts "
                                   "with such `input_ids`")
        mask = batch.get("attention_mask")
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids) if mask is None else mask})
    if not batches:
        raise SafeneuronsError("no token inputs to trace")
    return batches


class ActivationRecorder(Hooks):
    """Copies each batch's unmasked rows of the sites' outputs into preallocated arrays, token after token."""

    def __init__(self, points: Mapping[SiteKey, SitePoint], arrays: Mapping[SiteKey, np.ndarray]) -> None:
        super().__init__()
        self.offset = 0
        self.keep: torch.Tensor | None = None
        for key, point in points.items():
            if point.part is not None:  # an MoE layer's units: every expert on every token, from the experts' input
                self.on_input(point.module, self._record_experts(arrays[key], point))
            else:
                self.on_output(point.module, self._record(arrays[key], point.columns or slice(None)))

    def _record(self, array: np.ndarray, columns: slice):
        def record(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
            self._write(array, output.detach().reshape(-1, output.shape[-1])[:, columns])

        return record

    def _record_experts(self, array: np.ndarray, point: SitePoint):
        def record(_module: nn.Module, args: tuple) -> None:
            self._write(array, point.moe.experts.every_expert(args[0].detach(), point.part))

        return record

    def _write(self, array: np.ndarray, values: torch.Tensor) -> None:
        rows = values[self.keep]
        array[self.offset:self.offset + rows.shape[0]] = rows.float().cpu().numpy()


def allocate_arrays(shapes: Mapping[SiteKey, tuple[int, int]], memory_limit: float | None,
              spill_dir: str | Path | None) -> tuple[dict[SiteKey, np.ndarray], tempfile.TemporaryDirectory | None]:
    total = sum(4 * rows * cols for rows, cols in shapes.values())
    if memory_limit is None or total <= memory_limit:
        return {key: np.empty(shape, dtype=np.float32) for key, shape in shapes.items()}, None
    spill = tempfile.TemporaryDirectory(prefix="safeneurons-trace-", dir=spill_dir)
    log.info("activations take %.1f MiB, above the memory limit of %.1f MiB: spilling them to %s",
             total / 2 ** 20, memory_limit / 2 ** 20, spill.name)
    arrays = {(layer, kind): np.memmap(Path(spill.name) / f"{kind}-{layer}.f32", dtype=np.float32, mode="w+", shape=shape)
              for (layer, kind), shape in shapes.items()}
    return arrays, spill


def collect_mlp_activations(model: nn.Module, inputs: TokenInputs, layers: Iterable[int] | None = None,
                            kinds: Sequence[str] = KINDS, memory_limit: float | None = None,
                            spill_dir: str | Path | None = None) -> MlpActivations:
    """One pass of `model` over `inputs`, recording the gate and/or up outputs of `layers` (default all) as
    float32 on the CPU; above `memory_limit` bytes they go to memmaps in a temporary folder under `spill_dir`.
    Under ZeRO-3 every rank must call this with the same batches, even with no layers of its own."""
    blocks = decoder_layers(model)
    layers = sorted(set(range(len(blocks)) if layers is None else layers))
    if layers and not 0 <= layers[0] <= layers[-1] < len(blocks):
        raise SafeneuronsError(f"layers {layers} are out of range for a model with {len(blocks)} decoder layers")
    batches = as_batches(inputs)
    n_tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    points = {(layer, kind): site_point(model, layer, kind) for layer in layers for kind in kinds}
    arrays, spill = allocate_arrays({key: (n_tokens, output_width(point)) for key, point in points.items()},
                              memory_limit, spill_dir)
    if points or is_zero3_partitioned(model):  # ZeRO-3 forwards are collective: every rank takes part
        _run_and_record(model, batches, points, arrays)
    return MlpActivations.from_arrays(arrays, n_tokens, spill)


def _run_and_record(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]],
                    points: Mapping[SiteKey, SitePoint], arrays: Mapping[SiteKey, np.ndarray]) -> None:
    device = model_device(model)
    decoder = model.model  # the decoder stack alone: the vocabulary projection is not needed
    with ActivationRecorder(points, arrays) as recorder, torch.no_grad():
        for batch in distributed.progress(batches, desc="tracing forwards", unit="batch", leave=False):
            mask = batch["attention_mask"].to(device)
            recorder.keep = mask.reshape(-1).bool()
            decoder(input_ids=batch["input_ids"].to(device), attention_mask=mask, use_cache=False)
            recorder.offset += int(mask.sum())


def token_chunk(n_batches: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous share of the batches (contiguous, so that the chunks concatenate in token order)."""
    size = math.ceil(n_batches / world)
    return range(min(rank * size, n_batches), min((rank + 1) * size, n_batches))


def collect_shared(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]],
                   needed: Mapping[SiteKey, set[int]], memory_limit: float | None = None,
                   spill_dir: str | Path | None = None) -> MlpActivations:
    """Collective: the ranks split the tokens (each runs the model over a contiguous chunk of the batches, recording
    every needed layer), then each (layer, kind) output is gathered, in token order, on the ranks that `needed`
    names (the activations cross the network once instead of every rank running every token). Returns this
    rank's layers over all the tokens. Under ZeRO-3 a rank with fewer batches runs padding passes, as every forward
    is collective. A single process records its layers directly."""
    world, rank = distributed.world_size(), distributed.rank()
    layers = {layer for layer, _ in needed}
    if world == 1:
        return collect_mlp_activations(model, batches, layers, memory_limit=memory_limit, spill_dir=spill_dir)
    chunks = [token_chunk(len(batches), index, world) for index in range(world)]
    local = collect_mlp_activations(model, [batches[index] for index in chunks[rank]], layers,
                                    memory_limit=memory_limit, spill_dir=spill_dir) if chunks[rank] else None
    if is_zero3_partitioned(model):
        _run_and_record(model, [batches[0]] * (len(chunks[0]) - len(chunks[rank])), {}, {})
    counts = [sum(int(batches[index]["attention_mask"].sum()) for index in chunk) for chunk in chunks]
    widths = {key: output_width(site_point(model, *key)) for key in needed}
    return gather_in_token_order(local, needed, widths, counts, rank, collective_device(model_device(model)),
                                 memory_limit, spill_dir)


def gather_in_token_order(local: MlpActivations | None, needed: Mapping[SiteKey, set[int]],
                          widths: Mapping[SiteKey, int], counts: Sequence[int], member: int, device: torch.device,
                          memory_limit: float | None, spill_dir: str | Path | None,
                          group: Any = None) -> MlpActivations:
    """Collective over `group` (default all ranks), whose `member`-th rank recorded `local` over its chunk of
    `counts[member]` tokens: each site's chunks concatenated in member order on the ranks `needed` names."""
    rank = distributed.rank()
    mine = {key: (sum(counts), width) for key, width in widths.items() if rank in needed[key]}
    arrays, spill = allocate_arrays(mine, memory_limit, spill_dir)
    for key in sorted(needed):
        sent = torch.zeros(max(counts), widths[key], device=device)
        if local is not None:
            sent[:counts[member]] = torch.from_numpy(np.ascontiguousarray(local.get(key[1], key[0]))).to(device)
        for owner in sorted(needed[key]):
            parts = gather_to_owner(sent, owner, group)
            if rank == owner:
                arrays[key][:] = torch.cat([part[:count] for part, count in zip(parts, counts)]).cpu().numpy()
    return MlpActivations.from_arrays(arrays, sum(counts), spill)
