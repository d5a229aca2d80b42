"""Model checkpoints as files: the safetensors weights of an HF folder read tensor by tensor and rewritten shard by
shard, so that a stage that edits weights (rewind, streaming prune) never holds a whole model in memory.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from safeneurons.errors import SafeneuronsError
from safeneurons.runtime import distributed
from safeneurons.runtime.outputs import staged, write_json

Result = TypeVar("Result")
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = WEIGHTS_FILE + ".index.json"


def check_safetensors(folder: Path) -> None:
    """Every safetensors file of a model folder must have a whole header and all the data it announces: a truncated
    or damaged file is one line naming it, before anything is loaded."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as error:  # safetensors raises its own error types for damaged files
            detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise SafeneuronsError(f"model file {path} is damaged or incomplete ({detail}); copy or download it "
                                   f"again") from None


class CheckpointFiles:
    """The safetensors weights of an HF folder (one file or shards with an index), read tensor by tensor."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        check_safetensors(folder)
        index = folder / INDEX_FILE
        if index.is_file():
            mapping = json.loads(index.read_text())["weight_map"]
            self.weight_map = {name: folder / shard for name, shard in mapping.items()}
        elif (folder / WEIGHTS_FILE).is_file():
            with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as handle:
                self.weight_map = {name: folder / WEIGHTS_FILE for name in handle.keys()}
        else:
            raise SafeneuronsError(f"{folder} is not an HF folder with safetensors weights ({WEIGHTS_FILE} or "
                                   f"{INDEX_FILE})")

    @property
    def shards(self) -> list[Path]:
        return sorted(set(self.weight_map.values()))

    def metadata(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Shape and dtype of every tensor, read from the file headers only."""
        found = {}
        for shard in self.shards:
            with safe_open(str(shard), framework="pt") as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    found[name] = (tuple(view.get_shape()), view.get_dtype())
        return found

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self.weight_map[name]), framework="pt") as handle:
            return handle.get_tensor(name)


def check_same_tensors(reference: CheckpointFiles, other: CheckpointFiles, reference_option: str,
                       other_option: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Both checkpoints hold the same tensors (names, shapes, dtypes), read from the file headers only; the error
    names the first misfit and the two options. Returns the reference's metadata."""
    expected, found = reference.metadata(), other.metadata()
    for name, (shape, dtype) in found.items():
        if name not in expected:
            raise SafeneuronsError(f"{other_option} has tensor {name!r}, which {reference_option} does not: not the "
                                   f"same architecture")
        if expected[name] != (shape, dtype):
            raise SafeneuronsError(f"tensor {name!r} is {shape} {dtype} in {other_option} but {expected[name][0]} "
                                   f"{expected[name][1]} in {reference_option}")
    missing = sorted(set(expected) - set(found))
    if missing:
        raise SafeneuronsError(f"{reference_option} has tensor {missing[0]!r}, which {other_option} does not")
    return expected


def rewrite_checkpoint(source: CheckpointFiles, out: Path, edit: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
    """Write `source`'s weights into `out`, shard by shard, each tensor passed through `edit(name, tensor)`; the
    folder's other files (config, tokenizer, index) are copied as they are."""
    for shard in source.shards:
        with safe_open(str(shard), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {name: edit(name, handle.get_tensor(name)) for name in handle.keys()}
        save_file(tensors, str(out / shard.name), metadata=metadata)
        del tensors
    for item in source.folder.iterdir():
        if item.suffix != ".safetensors" and item.is_file() and not item.name.startswith("."):
            shutil.copy2(item, out / item.name)


def write_on_main(out: str | Path, write: Callable[[Path], Result], summary_file: str,
                  summary_of: Callable[[Result], dict[str, Any]]) -> Result | None:
    """File work that one process does (rewriting checkpoints): on rank 0 `write(staging)` and its summary JSON,
    staged and published at `out` with one rename; None on the other ranks."""
    if not distributed.is_main():
        return None
    with staged(out) as staging:
        result = write(staging)
        write_json(staging / summary_file, summary_of(result))
    return result
