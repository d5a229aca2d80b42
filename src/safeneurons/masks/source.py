"""Masks given as tensors or as a mask file, read by flattened element ranges (row ranges of the file)."""
from __future__ import annotations

import math
import os
from typing import Mapping

import torch

from safeneurons.masks.io import MaskReader

MaskSource = Mapping[str, torch.Tensor] | str | os.PathLike


class MaskElements:
    """Reads element ranges of flattened masks from an in-memory dict or a mask file (row ranges only)."""

    def __init__(self, masks: MaskSource) -> None:
        if isinstance(masks, Mapping):
            self.tensors: dict[str, torch.Tensor] | None = {name: mask.to(torch.bool) for name, mask in masks.items()}
            self.reader: MaskReader | None = None
        else:
            self.tensors, self.reader = None, MaskReader(masks)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self.tensors is not None:
            return {name: tuple(mask.shape) for name, mask in self.tensors.items()}
        return self.reader.shapes()

    def elements(self, name: str, shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
        """Flattened mask elements [start, stop) of parameter `name` (shape `shape`)."""
        if self.tensors is not None:
            return self.tensors[name].reshape(-1)[start:stop]
        if stop <= start:
            return torch.zeros(0, dtype=torch.bool)
        row_size = math.prod(shape[1:]) if len(shape) > 1 else 1
        first_row, end_row = start // row_size, -(-stop // row_size)
        rows = self.reader.get_rows(name, first_row, end_row).reshape(-1)
        offset = start - first_row * row_size
        return rows[offset:offset + stop - start]
