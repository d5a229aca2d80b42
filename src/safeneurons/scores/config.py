"""What `score` is asked (ScoreConfig), what it returns (ScoreResult) and the Linears it scores."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from safeneurons.errors import SafeneuronsError
from safeneurons.models.blocks import block_of
from safeneurons.models.moe import moe_blocks
from safeneurons.models.structure import decoder_layers, scored_linears
from safeneurons.runtime import distributed
from safeneurons.runtime.distributed import broadcast_from_owner
from safeneurons.runtime.zero3 import full_shape
from safeneurons.scores.sizes import ACCUMULATE_DTYPES

if TYPE_CHECKING:
    from safeneurons.models.structure import ScoredLinear

log = logging.getLogger(__name__)

METHODS = ("wanda", "wandg", "random")
GRANULARITIES = ("weight", "neuron", "head", "expert")
SETDIFF_SCOPES = ("matrix", "row")
DEFAULT_UTILITY_DATA = "alpaca_cleaned_no_safety"
DEFAULT_SPARSITY = 0.1  # one default everywhere (score, pipeline, plan): the original extension's
SUMMARY_FILE = "score_summary.json"
SCORES_FILE = "scores.safetensors"
SCORES_INDEX_FILE = SCORES_FILE + ".index.json"


@dataclass
class ScoreConfig:
    method: str
    data: str
    sparsity_ratio: float
    nsamples: int = 128
    seed: int = 0
    max_length: int = 512
    granularity: str = "weight"
    utility_data: str | None = None
    p: float | None = None
    q: float | None = None
    sequential: bool = False
    data_dir: str | None = None
    keep_scores: bool = False  # return the raw safety scores in ScoreResult.scores
    batch_size: int = 1  # samples per forward/backward pass (per-sample statistics either way)
    add_eos: bool = False  # append EOS to each response (the original work does not)
    score_memory: int | None = None  # bytes of wandg's sums per rank; None = half of what is free
    accumulate_dtype: str = "fixed"  # how per-sample statistics are summed (scores.accumulators)
    setdiff_scope: str = "matrix"  # the set difference per flattened matrix (the original code) or per row (paper)

    @property
    def set_difference(self) -> bool:
        return self.p is not None or self.q is not None or self.utility_data is not None

    @property
    def utility_source(self) -> str:
        return self.utility_data or DEFAULT_UTILITY_DATA

    def validate(self) -> None:
        """Raise SafeneuronsError naming the first bad value."""
        if self.method not in METHODS:
            raise SafeneuronsError(f"unknown scoring method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.granularity not in GRANULARITIES:
            raise SafeneuronsError(f"granularity {self.granularity!r} is not one of {', '.join(GRANULARITIES)}")
        if not isinstance(self.sparsity_ratio, (int, float)) or not 0 < self.sparsity_ratio < 1:
            raise SafeneuronsError(f"sparsity ratio {self.sparsity_ratio!r} must lie in (0, 1)")
        if self.nsamples <= 0:
            raise SafeneuronsError(f"nsamples={self.nsamples} must be a positive integer")
        if self.batch_size < 1:
            raise SafeneuronsError(f"batch size {self.batch_size} must be a positive integer")
        if self.score_memory is not None and self.score_memory < 1:
            raise SafeneuronsError(f"score memory {self.score_memory} must be a positive number of bytes")
        if self.max_length < 2:
            raise SafeneuronsError(f"max_length={self.max_length} must be at least 2 tokens")
        if self.accumulate_dtype not in ACCUMULATE_DTYPES:
            raise SafeneuronsError(f"--accumulate-dtype {self.accumulate_dtype!r} is not one of "
                                   f"{', '.join(ACCUMULATE_DTYPES)}")
        if self.accumulate_dtype == "model" and self.method != "wandg":
            raise SafeneuronsError(f"--accumulate-dtype model reproduces the original's gradient sums in the model's "
                                   f"dtype; it applies to wandg, not {self.method}")
        if self.setdiff_scope not in SETDIFF_SCOPES:
            raise SafeneuronsError(f"--setdiff-scope {self.setdiff_scope!r} is not one of {', '.join(SETDIFF_SCOPES)}")
        if self.setdiff_scope == "row" and self.granularity != "weight":
            raise SafeneuronsError("--setdiff-scope row ranks the weights of each row; with granularity "
                                   f"{self.granularity} the units are whole rows or heads: use the default, matrix")
        if self.set_difference and self.granularity in ("head", "expert"):
            raise SafeneuronsError(f"granularity {self.granularity} ranks whole {self.granularity}s by "
                                   "--sparsity-ratio; the set difference (--p/--q/--utility-data) works per weight or "
                                   "per neuron")
        if self.set_difference:
            for name, value in (("p", self.p), ("q", self.q)):
                if value is None:
                    raise SafeneuronsError(f"the set difference against {self.utility_source!r} needs both --p and "
                                           f"--q; --{name} is missing")
                if not 0 < value <= 1:
                    raise SafeneuronsError(f"--{name} {value!r} must lie in (0, 1]")


def check_granularity(model: nn.Module, config: ScoreConfig, name: str = "") -> None:
    """Granularity expert needs routed experts, and a ratio that selects at least one expert of a layer (checked on
    the skeleton, before weights load)."""
    if config.granularity != "expert":
        return
    counts = [block.num_experts for block in moe_blocks(decoder_layers(model), model.config).values()]
    if not counts:
        raise SafeneuronsError(f"--granularity expert ranks the routed experts of a mixture of experts; model "
                               f"{name or type(model).__name__} (family {model.config.model_type!r}) has none")
    if int(min(counts) * config.sparsity_ratio) < 1:
        raise SafeneuronsError(f"--sparsity-ratio {config.sparsity_ratio} selects no expert of a layer of "
                               f"{min(counts)} experts; expected at least {1 / min(counts):.4g}")


def summary_beside(masks: str | os.PathLike) -> dict[str, Any] | None:
    """The score_summary.json written beside a mask file (or in its folder), when there is one."""
    path = Path(masks)
    summary = (path if path.is_dir() else path.parent) / SUMMARY_FILE
    return json.loads(summary.read_text()) if summary.is_file() else None


def config_from_summary(summary: Mapping[str, Any], data_dir: str | None = None) -> ScoreConfig:
    """The ScoreConfig a score_summary.json records (its settings are ScoreConfig's fields)."""
    names = {item.name for item in fields(ScoreConfig)} - {"keep_scores", "data_dir"}
    return ScoreConfig(**{key: value for key, value in summary.items() if key in names}, data_dir=data_dir)


@dataclass
class ScoreResult:
    masks: dict[str, torch.Tensor]  # the parameters this rank owns (all of them on 1 rank)
    scores: dict[str, torch.Tensor] | None  # float32 safety scores, same keys, when config.keep_scores
    summary: dict[str, Any]  # complete on rank 0


@dataclass(frozen=True)
class Target:
    """A scored matrix (models.structure.ScoredLinear), its position in the global order and the rank that owns
    its layer."""

    index: int
    linear: ScoredLinear
    owner: int

    @property
    def name(self) -> str:
        return self.linear.param_name

    @property
    def weight(self) -> nn.Parameter:
        return self.linear.weight

    @property
    def shape(self) -> tuple[int, ...]:
        return full_shape(self.weight)

    def statistic_shape(self, with_grads: bool) -> tuple[int, ...]:
        """wandg's statistic is shaped like the weight; wanda's has one value per input column (per expert for an
        experts' matrix: [E, in])."""
        if with_grads:
            return self.shape
        bank = self.linear.experts
        if bank is None:
            return (self.shape[1],)
        return (bank.num_experts, self.shape[1] if bank.transposed else self.shape[2])

    @property
    def mine(self) -> bool:
        return self.owner == distributed.rank()


def targets_of(model: nn.Module) -> list[Target]:
    """The scored Linears, each owned by the rank of its layer: round robin, or on a layer-sharded model the
    stage that holds the layer."""
    block = block_of(model)
    owner = distributed.owner_of if block is None else block.split.stage_of
    return [Target(index, linear, owner(linear.layer)) for index, linear in enumerate(scored_linears(model))]


def mask_on_every_rank(mask: torch.Tensor | None, target: Target, device: torch.device) -> torch.Tensor:
    """The owner's mask of one Linear, sent to every rank (one layer's masks at a time, never the model's)."""
    buffer = mask.to(torch.uint8) if target.mine else torch.zeros(target.shape, dtype=torch.uint8)
    return broadcast_from_owner(buffer.to(device), target.owner).bool()
