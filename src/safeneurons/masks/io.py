"""Mask files: bool tensors named exactly like the model's parameters, 1 = safety-critical.

One `masks.safetensors`, or, when written by several ranks or when large, shards
`masks-00001-of-0000N.safetensors` with a `masks.safetensors.index.json` in the HF convention
(`{"metadata": {...}, "weight_map": {name: shard file}}`). Readers can fetch single tensors or row ranges,
so a rank never has to hold the whole model's mask.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from safeneurons.errors import SafeneuronsError
from safeneurons.runtime.outputs import atomic_file, write_json

MASKS_FILE = "masks.safetensors"
INDEX_FILE = MASKS_FILE + ".index.json"


def shard_name(index: int, count: int, stem: str = "masks") -> str:
    return f"{stem}-{index + 1:05d}-of-{count:05d}.safetensors"


CHECKSUM_PREFIX = "sha256:"  # file metadata key prefix: one checksum of each tensor's data bytes


def checksum(mask: torch.Tensor) -> str:
    return hashlib.sha256(mask.to(torch.bool).contiguous().numpy().tobytes()).hexdigest()


def save_masks(masks: Mapping[str, torch.Tensor], directory: str | os.PathLike,
               filename: str = MASKS_FILE, metadata: Mapping[str, str] | None = None) -> Path:
    """Write `masks` (converted to bool) to one safetensors file, atomically, with each tensor's checksum in the
    file's metadata (readers verify it)."""
    path = Path(directory) / filename
    tensors = {name: mask.detach().to(torch.bool).contiguous().cpu() for name, mask in masks.items()}
    sums = {CHECKSUM_PREFIX + name: checksum(mask) for name, mask in tensors.items()}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={**dict(metadata or {"format": "pt"}), **sums})
        sort_header_metadata(tmp)
    return path


def sort_header_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its metadata keys sorted (safetensors writes them in hash order, so that
    reruns would differ byte for byte); the header keeps its length, the data is not touched."""
    with open(path, "r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= length:  # the same entries in another order: never longer than the original
            handle.seek(8)
            handle.write(text.ljust(length))


def save_mask_shard(masks: Mapping[str, torch.Tensor], directory: str | os.PathLike, index: int, count: int,
                    stem: str = "masks") -> Path:
    """One rank's shard of a sharded mask file; `write_index` on rank 0 completes it."""
    return save_masks(masks, directory, shard_name(index, count, stem))


def write_index(directory: str | os.PathLike, weight_map: Mapping[str, str], metadata: Mapping | None = None,
                index_file: str = INDEX_FILE) -> Path:
    """The HF-style index that names the shard holding each parameter's mask."""
    ordered = dict(sorted(weight_map.items(), key=lambda item: _natural_key(item[0])))
    return write_json(Path(directory) / index_file, {"metadata": dict(metadata or {}), "weight_map": ordered})


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in name.replace(".", " . ").split()]


_VERIFIED: set[tuple[str, int, int, str]] = set()  # (file, size, mtime, tensor) whose checksum matched


class MaskReader:
    """Lazy access to a mask file or a sharded mask folder."""

    def __init__(self, source: str | os.PathLike) -> None:
        self.weight_map = _weight_map(Path(source))
        self._verified: set[str] = set()

    @property
    def names(self) -> list[str]:
        return list(self.weight_map)

    def _open(self, name: str):
        if name not in self.weight_map:
            raise SafeneuronsError(f"mask file has no tensor named {name!r}")
        if name not in self._verified:
            self._verify(name)
        return safe_open(str(self.weight_map[name]), framework="pt")

    def _verify(self, name: str) -> None:
        """Compare a tensor's data with the checksum its file records (files written without one pass). A tensor
        of an unchanged file is verified once per process, whichever reader asks (finetune checks every mask before
        the model loads; freezing then reads them again)."""
        path = self.weight_map[name]
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, name)
        if key in _VERIFIED:
            self._verified.add(name)
            return
        expected = self.recorded_checksum(name)
        with safe_open(str(path), framework="pt") as handle:
            if expected is not None and checksum(handle.get_tensor(name)) != expected:
                raise SafeneuronsError(f"mask {name!r} in {self.weight_map[name]} does not match its checksum: the "
                                       f"file is corrupted; score again or restore it")
        self._verified.add(name)
        _VERIFIED.add(key)

    def recorded_checksum(self, name: str) -> str | None:
        """The checksum the file records for tensor `name` (from its header), None when it records none."""
        with safe_open(str(self.weight_map[name]), framework="pt") as handle:
            return (handle.metadata() or {}).get(CHECKSUM_PREFIX + name)

    def verify(self) -> None:
        """Check every tensor against the checksum its file records (reads all the masks once)."""
        for name in self.names:
            if name not in self._verified:
                self._verify(name)

    def fingerprint(self) -> str | None:
        """What the masks are, whatever path names them: a digest of every tensor's name and recorded checksum
        (None when a file records no checksums)."""
        digest = hashlib.sha256()
        for name in sorted(self.weight_map):
            recorded = self.recorded_checksum(name)
            if recorded is None:
                return None
            digest.update(f"{name}:{recorded}\n".encode())
        return CHECKSUM_PREFIX + digest.hexdigest()

    def shape(self, name: str) -> tuple[int, ...]:
        with self._open(name) as handle:
            return tuple(handle.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        with self._open(name) as handle:
            return handle.get_tensor(name).to(torch.bool)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a mask, read without loading the rest."""
        with self._open(name) as handle:
            return handle.get_slice(name)[start:stop].to(torch.bool)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: self.shape(name) for name in self.names}


def _weight_map(source: Path) -> dict[str, Path]:
    if source.is_dir():
        index = source / INDEX_FILE
        source = index if index.is_file() else source / MASKS_FILE
    if not source.is_file():
        raise SafeneuronsError(f"mask file {source} does not exist (expected {MASKS_FILE} or {INDEX_FILE})")
    if source.name.endswith(".index.json"):
        try:
            weight_map = json.loads(source.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise SafeneuronsError(f"mask index {source} is not an HF index file with a weight_map") from None
        return {name: source.parent / shard for name, shard in weight_map.items()}
    try:
        with safe_open(str(source), framework="pt") as handle:
            return {name: source for name in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise SafeneuronsError(f"mask file {source} is not a readable safetensors file ({error})") from None


def load_masks(source: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """All masks (or those named) as bool tensors."""
    reader = MaskReader(source)
    return {name: reader.get(name) for name in (reader.names if names is None else names)}


def check_masks_fit(mask_shapes: Mapping[str, tuple[int, ...]], param_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Every mask must name a parameter of the model and have its shape; the error names the first misfit."""
    for name, shape in mask_shapes.items():
        if name not in param_shapes:
            prefix = name.rsplit(".", 2)[0] + "."  # the mask's module's parent, e.g. model.layers.0.mlp.
            near = sorted(param for param in param_shapes if param.startswith(prefix))
            hint = f"; the model has {', '.join(near[:3])}{', …' if len(near) > 3 else ''} there" if near else ""
            raise SafeneuronsError(f"mask {name!r} names no parameter of the model (masks of another model?){hint}")
        if tuple(shape) != tuple(param_shapes[name]):
            raise SafeneuronsError(f"mask {name!r} has shape {tuple(shape)} but the parameter has "
                                   f"{tuple(param_shapes[name])}")


def check_mask_file_fits(masks: str | os.PathLike, model: str, cache_dir: str | None = None) -> None:
    """A mask file's tensors against a model's parameters, from the file's header and the model's config: no
    weight is read, so a mask of another model fails before any loads."""
    from safeneurons.models.loading import model_skeleton
    from safeneurons.runtime.zero3 import named_parameters_with_shapes

    check_masks_fit(MaskReader(masks).shapes(), named_parameters_with_shapes(model_skeleton(model, cache_dir)))


def count_selected(masks: Mapping[str, torch.Tensor]) -> int:
    return int(sum(int(mask.sum()) for mask in masks.values()))
