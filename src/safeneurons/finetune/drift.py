"""How much weights moved: per-parameter change statistics of frozen and free elements."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DriftStats:
    """Absolute weight change between two models, over the elements a mask selects (frozen) and the rest (free)."""

    frozen_count: int = 0
    free_count: int = 0
    frozen_abs_sum: float = 0.0
    free_abs_sum: float = 0.0
    max_abs_change_frozen: float = 0.0
    max_abs_change_free: float = 0.0

    def add(self, other: "DriftStats") -> None:
        self.frozen_count += other.frozen_count
        self.free_count += other.free_count
        self.frozen_abs_sum += other.frozen_abs_sum
        self.free_abs_sum += other.free_abs_sum
        self.max_abs_change_frozen = max(self.max_abs_change_frozen, other.max_abs_change_frozen)
        self.max_abs_change_free = max(self.max_abs_change_free, other.max_abs_change_free)

    @property
    def mean_abs_change_frozen(self) -> float | None:
        return self.frozen_abs_sum / self.frozen_count if self.frozen_count else None

    @property
    def mean_abs_change_free(self) -> float | None:
        return self.free_abs_sum / self.free_count if self.free_count else None

    def to_json(self) -> dict:
        return {"frozen_count": self.frozen_count, "free_count": self.free_count,
                "mean_abs_change_frozen": self.mean_abs_change_frozen,
                "mean_abs_change_free": self.mean_abs_change_free,
                "max_abs_change_frozen": self.max_abs_change_frozen,
                "max_abs_change_free": self.max_abs_change_free}

    @classmethod
    def of(cls, before: torch.Tensor, after: torch.Tensor, mask: torch.Tensor) -> "DriftStats":
        change = (after.double() - before.double()).abs()
        frozen, free = change[mask], change[~mask]
        return cls(frozen.numel(), free.numel(), float(frozen.sum()), float(free.sum()),
                   float(frozen.max()) if frozen.numel() else 0.0, float(free.max()) if free.numel() else 0.0)
