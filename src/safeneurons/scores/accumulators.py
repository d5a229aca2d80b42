"""Sums of per-sample statistics over the calibration samples, in one of three arithmetics (`--accumulate-dtype`).

- `exact` (the default): every per-sample fp32 term is added exactly, in fixed point (two int64 words per element),
  and the sum is rounded to fp32 once at the end. Integer addition is associative, so the sum — and so the mask —
  is the same bit for bit whichever rank adds which sample, in whatever order, for any number of ranks.
- `float32`: running fp32 sums (4 bytes per element instead of 16); the last bits depend on the order in which
  samples are added, and so on the number of ranks.
- `model`: running sums in the model's dtype, as the original code's gradient buffers (`zeros_like(weight)`) do
  under bf16.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch

from safeneurons.errors import SafeneuronsError
from safeneurons.runtime import distributed
from safeneurons.runtime.distributed import reduce_each_to_owner
from safeneurons.scores.sizes import AUTO_MEMORY_FRACTION, owned_bytes

# Fixed point: the high word counts units of 2^-20 and the low word units of 2^-72. A term below 2^-72 (2e-22)
# adds nothing; the high word holds sums up to 2^43 (8.8e12), the low word 2^11 terms between carries.
HIGH_UNIT_BITS = 20
LOW_UNIT_BITS = 72
LOW_WORD_BITS = LOW_UNIT_BITS - HIGH_UNIT_BITS
LARGEST_TERM = 2.0 ** 43
CARRY_EVERY = 2 ** 10  # terms between carries, so that the low word (< 2^52 per term) never overflows int64

log = logging.getLogger(__name__)


def _fixed_point_add(high: torch.Tensor, low: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """high += the whole units of term · 2^20, low += its fraction below one unit in units of 2^-72; returns the
    largest term. Every step is exact in fp32 or int64 (scaling by a power of 2; truncation, the floor of a term
    that is not negative; a term of 24 significant bits minus its whole part), so any order of evaluation, fused or
    not, gives the same words; a NaN, inf or too large term leaves words that `ExactSum.value` never reads."""
    scaled = term.float() * 2.0 ** HIGH_UNIT_BITS
    whole = scaled.to(torch.int64)
    high += whole
    low += ((scaled - whole.float()) * 2.0 ** LOW_WORD_BITS).to(torch.int64)
    return term.max()


_fused_add: list = []  # the compiled `_fixed_point_add`, made on first use (None where compiling failed)


def fixed_point_add(high: torch.Tensor, low: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """`_fixed_point_add` in one pass over memory: torch.compile fuses its steps into one kernel (on CPU and GPU),
    with no temporary the size of the term, about 15× faster on the CPU than the eager steps at 4M elements; where
    compiling is not possible (no C++ compiler, say) the eager steps run, with the same result bit for bit."""
    if not _fused_add:
        try:
            _fused_add.append(torch.compile(_fixed_point_add, dynamic=True))
        except Exception:  # torch.compile unavailable on this platform: the eager steps
            _fused_add.append(None)
    if _fused_add[0] is not None:
        try:
            return _fused_add[0](high, low, term)
        except Exception as error:  # compiling failed at its first call (a missing compiler): eager from now on
            log.warning("the fused exact-sum kernel could not be compiled (%s); the eager steps run instead",
                        str(error).splitlines()[0] if str(error) else type(error).__name__)
            _fused_add[0] = None
    return _fixed_point_add(high, low, term)


class ExactSum:
    """Σ of non-negative fp32 terms, exactly, as integers: high · 2^-20 + low · 2^-72."""

    def __init__(self, shape: Sequence[int] | int, device: torch.device) -> None:
        self.high = torch.zeros(shape, dtype=torch.int64, device=device)
        self.low = torch.zeros(shape, dtype=torch.int64, device=device)
        self.flags = torch.zeros(2, dtype=torch.int64, device=device)  # terms not finite; terms too large
        self.pending = 0

    def add(self, term: torch.Tensor, index: int | None = None) -> None:
        """Add `term` to the whole sum, or to its slice `index` (one expert's of an experts' matrix)."""
        high, low = (self.high, self.low) if index is None else (self.high[index], self.low[index])
        largest = fixed_point_add(high, low, term)  # NaN when a term is NaN
        self.flags[0] += ~torch.isfinite(largest)
        self.flags[1] += largest >= LARGEST_TERM
        self.pending += 1
        if self.pending == CARRY_EVERY:
            self.carry()

    def carry(self) -> None:
        """Move whole high units out of the low word (exact: the represented sum does not change)."""
        carried = torch.div(self.low, 2 ** LOW_WORD_BITS, rounding_mode="floor")
        self.high += carried
        self.low -= carried * 2 ** LOW_WORD_BITS
        self.pending = 0

    def tensors(self) -> list[torch.Tensor]:
        self.carry()  # each rank's low word < 2^52, so the sum over up to 2^11 ranks fits
        return [self.high, self.low, self.flags]

    def value(self, name: str) -> torch.Tensor:
        """The fp32 sum (NaN where a term was not finite, for the caller's finiteness check to name)."""
        if int(self.flags[0]):
            return torch.full(self.high.shape, float("nan"), device=self.high.device)
        if int(self.flags[1]):  # (an inf term counts as not finite, above)
            raise SafeneuronsError(f"a per-sample statistic of {name} reaches {LARGEST_TERM:.3g}, beyond the exact "
                                   "sums' range; use --accumulate-dtype float32")
        self.carry()
        total = self.high.double() * 2.0 ** -HIGH_UNIT_BITS + self.low.double() * 2.0 ** -LOW_UNIT_BITS
        return total.float()


class RunningSum:
    """Σ of terms in one floating dtype, in the order they are added."""

    def __init__(self, shape: Sequence[int] | int, device: torch.device, dtype: torch.dtype) -> None:
        self.total = torch.zeros(shape, dtype=dtype, device=device)

    def add(self, term: torch.Tensor, index: int | None = None) -> None:
        """Add `term` to the whole sum, or to its slice `index`."""
        total = self.total if index is None else self.total[index]
        total += term.to(total.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.total]

    def value(self, name: str) -> torch.Tensor:
        return self.total


Accumulator = ExactSum | RunningSum


def new_accumulator(accumulate_dtype: str, shape: Sequence[int] | int, device: torch.device,
                    model_dtype: torch.dtype) -> Accumulator:
    if accumulate_dtype == "exact":
        return ExactSum(shape, device)
    return RunningSum(shape, device, torch.float32 if accumulate_dtype == "float32" else model_dtype)


def accumulator_bytes(targets: Sequence[Any], element_size: int) -> int:
    """Bytes of the targets' (scores.config.Target) weight-sized sums."""
    return sum(element_size * math.prod(target.shape) for target in targets)


def accumulation_rounds(targets: Sequence[Any], budget: int, element_size: int) -> list[list[Any]]:
    """One round when all the sums fit `budget` bytes; else consecutive targets whose accumulators fit what the
    budget leaves beside the sums that earlier rounds leave on a rank (a Linear larger than that gets a round of
    its own). The same on every rank."""
    if accumulator_bytes(targets, element_size) <= budget:
        return [list(targets)]
    owned = max(accumulator_bytes([target for target in targets if target.owner == rank], owned_bytes(element_size))
                for rank in {target.owner for target in targets})
    rounds: list[list[Any]] = [[]]
    for target in targets:
        if rounds[-1] and accumulator_bytes(rounds[-1] + [target], element_size) > budget - owned:
            rounds.append([])
        rounds[-1].append(target)
    return rounds


def score_memory_budget(config: Any, device: torch.device) -> int:
    """Bytes for wandg's local accumulators: `score_memory`, or half of what this rank can still allocate; the
    smallest over the ranks, so that every rank runs the same rounds."""
    budget = config.score_memory
    if budget is None:
        budget = int(AUTO_MEMORY_FRACTION * distributed.available_memory(device))
    return min(distributed.all_gather(budget))


def statistic_accumulators(targets: Sequence[Any], accumulate_dtype: str, with_grads: bool, device: torch.device,
                           model_dtype: torch.dtype) -> tuple[dict[str, Accumulator], torch.dtype]:
    """Per target (scores.config.Target) the accumulator of its statistic — wandg's weight-sized |∂L/∂W| sums
    (`with_grads`), or wanda's per-column Σ x² —, and the dtype each per-sample term is taken in."""
    sums = {target.name: new_accumulator(accumulate_dtype, target.statistic_shape(with_grads), device, model_dtype)
            for target in targets}
    return sums, model_dtype if accumulate_dtype == "model" else torch.float32


def reduce_accumulators_to_owners(accumulators: Sequence[tuple[Accumulator, int]]) -> None:
    """Each accumulator summed over the ranks onto its owner (integer words add exactly, in any order)."""
    reduce_each_to_owner([(tensor, owner) for accumulator, owner in accumulators for tensor in accumulator.tensors()])
