"""Sums of per-sample statistics over the calibration samples, in one of four arithmetics (`--accumulate-dtype`).

- `fixed` (the default): one int64 word per element. Each per-sample fp32 term is truncated to a unit fixed per row
  before the first term is added, and added as an integer; the sum is rounded to fp32 once (to nearest, ties to
  even). Integer addition is associative, so the sum — and so the mask — is the same bit for bit whichever rank
  adds which sample, in whatever order, for any number of ranks and any batch size. A row's unit is
  2^(e + HEADROOM_BITS + ⌈log2 N⌉ − 62) for N samples, where 2^e is the power of two just above the row's largest
  term in the first calibration sample (the rank that holds that sample sends it to every rank: `agree_on_units`).
  A term of at least 2^(⌈log2 N⌉ − 19) times that reference is added exactly; a smaller one loses what lies below
  the unit, so a sum is less than N units below the exact sum (2^(2⌈log2 N⌉ − 42) of the reference). A term of
  2^(e + HEADROOM_BITS) or more (over 2^20 times the reference) is an error that names the matrix and `exact`.
- `exact`: every term added exactly, in two int64 words per element (16 bytes), whatever its size: no reference,
  no loss; the price of `fixed` twice over in memory and traffic.
- `float32`: running fp32 sums (4 bytes per element); the last bits depend on the order in which samples are
  added, and so on the number of ranks.
- `model`: running sums in the model's dtype, as the original code's gradient buffers (`zeros_like(weight)`) do
  under bf16.
"""
from __future__ import annotations

import logging
import math
import threading
from typing import Any, Callable, Mapping, Sequence

import torch

from safeneurons.runtime import distributed
from safeneurons.runtime.distributed import reduce_each_to_owner
from safeneurons.scores.sizes import AUTO_MEMORY_FRACTION, owned_bytes

# `exact`: the high word counts units of 2^-20 and the low word units of 2^-72. A term below 2^-72 (2e-22) adds
# nothing; the high word holds sums up to 2^43 (8.8e12), the low word 2^11 terms between carries.
HIGH_UNIT_BITS = 20
LOW_UNIT_BITS = 72
LOW_WORD_BITS = LOW_UNIT_BITS - HIGH_UNIT_BITS
LARGEST_TERM = 2.0 ** 43
CARRY_EVERY = 2 ** 10  # terms between carries, so that the low word (< 2^52 per term) never overflows int64
# `fixed`: the N terms of a sum stay below 2^62 units together (no int64 overflow, whichever rank adds which);
# a later term may reach 2^20 (a million) times the first sample's largest of its row (smollm2-safe's reach
# 2^10 on 8 align_short samples).
SUM_BITS = 62
HEADROOM_BITS = 20
LARGEST_SCALE_EXPONENT = 126  # fp32's powers of two stop at 2^127

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


def _scaled_add(words: torch.Tensor, scale: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """words += ⌊term · scale⌋ (scale: a power of two per row, so the product is exact); returns the largest
    scaled term (NaN when a term is NaN, inf or huge when it is beyond the headroom)."""
    scaled = term.float() * scale
    words += scaled.to(torch.int64)
    return scaled.max()


class ChunkScratch:
    """fp32 and int64 buffers of a chunk's size, allocated once per device: eager steps that allocate their
    temporaries on every chunk spend more in page faults than in arithmetic (10 s of a 17 s loop, measured)."""

    def __init__(self, elements: int, device: torch.device) -> None:
        self.float_buffer = torch.empty(elements, device=device)
        self.int_buffer = torch.empty(elements, dtype=torch.int64, device=device)

    def floats(self, shape: torch.Size) -> torch.Tensor:
        return self.float_buffer[:shape.numel()].view(shape)

    def ints(self, shape: torch.Size) -> torch.Tensor:
        return self.int_buffer[:shape.numel()].view(shape)


def _fixed_point_add_into(high: torch.Tensor, low: torch.Tensor, term: torch.Tensor,
                          scratch: ChunkScratch) -> torch.Tensor:
    """`_fixed_point_add`, eagerly, its temporaries in `scratch`."""
    scaled = torch.mul(term, 2.0 ** HIGH_UNIT_BITS, out=scratch.floats(term.shape))
    whole = scratch.ints(term.shape).copy_(scaled)
    high += whole
    low += whole.copy_(scaled.sub_(whole).mul_(2.0 ** LOW_WORD_BITS))  # the fraction below one unit, in 2^-72
    return term.max()


def _scaled_add_into(words: torch.Tensor, scale: torch.Tensor, term: torch.Tensor,
                     scratch: ChunkScratch) -> torch.Tensor:
    """`_scaled_add`, eagerly, its temporaries in `scratch`."""
    scaled = torch.mul(term, scale, out=scratch.floats(term.shape))
    words += scratch.ints(term.shape).copy_(scaled)
    return scaled.max()


_EAGER = {_fixed_point_add: _fixed_point_add_into, _scaled_add: _scaled_add_into}
_scratch: dict[torch.device, ChunkScratch] = {}


# The eager steps run on chunks of about CHUNK_ELEMENTS elements (temporaries of a chunk's size); a run of at least
# COMPILE_WORTH element-adds compiles the step in the background and switches to it when ready. Measured on the CPU
# (one thread): compiling takes 2.5-5 s of CPU in a fresh process (importing and tracing), the compiled step adds
# 0.5 ns per element against 1.3-1.6 ns for the chunks (float32's running sum: 0.1-0.3 ns).
CHUNK_ELEMENTS = 2 ** 20  # on a GPU, 16 times more: each chunk is four kernel launches
COMPILE_WORTH = 5 * 10 ** 9
_compiled: dict[tuple[Callable, str], Callable | None] = {}  # (step, device type): ready, or None where it failed
_compiling: set[tuple[Callable, str]] = set()
_compiling_lock = threading.Lock()


def fused(step: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    """`step(*tensors)` (the term last), its largest value returned: one compiled pass over memory (torch.compile
    fuses the steps into one kernel, on CPU and GPU, about 3× faster than the eager chunks on the CPU) once
    `start_compiling` has it ready, the eager steps over chunks of rows until then (the passes never wait for the
    compiler). Every step is exact, so both give the same words bit for bit (tested); where compiling is not
    possible (no C++ compiler, say) the chunks go on."""
    key = (step, tensors[-1].device.type)
    compiled = _compiled.get(key)
    if compiled is None:
        return in_chunks(step, tensors)
    try:
        return compiled(*tensors)
    except Exception as error:  # a shape the compiler cannot build (a missing compiler): eager from now on
        log.warning("the fused sum kernel failed (%s); the eager steps run instead",
                    str(error).splitlines()[0] if str(error) else type(error).__name__)
        _compiled[key] = None
        return in_chunks(step, tensors)


def start_compiling(step: Callable[..., torch.Tensor], device: torch.device) -> None:
    """Compile `step` for `device` in a background thread, once per process."""
    key = (step, device.type)
    with _compiling_lock:
        if key in _compiling:
            return
        _compiling.add(key)
    threading.Thread(target=compile_step, args=(step, device), name="safeneurons-compile-sums", daemon=True).start()


def compile_step(step: Callable[..., torch.Tensor], device: torch.device) -> None:
    """torch.compile of `step` (dynamic shapes), run once on small tensors of `device` to build its kernel; ready
    for `fused` afterwards (or marked failed)."""
    try:
        compiled = torch.compile(step, dynamic=True)
        words = torch.zeros(3, 5, dtype=torch.int64, device=device)
        second = torch.ones(3, 1, device=device) if step is _scaled_add else torch.zeros_like(words)
        compiled(words, second, torch.rand(3, 5, device=device))
    except Exception as error:  # torch.compile unavailable here: the eager chunks stay
        log.info("the fused sum kernel cannot be compiled (%s); the eager steps run", type(error).__name__)
        compiled = None
    _compiled[(step, device.type)] = compiled


def compile_if_worth(accumulate_dtype: str, element_adds: int, device: torch.device) -> None:
    """Start compiling the add step of `accumulate_dtype`'s sums (fixed or exact) for `device` when a run of
    `element_adds` (samples × elements) pays for the compiler."""
    step = {"fixed": _scaled_add, "exact": _fixed_point_add}.get(accumulate_dtype)
    if step is not None and element_adds >= COMPILE_WORTH:
        start_compiling(step, device)


def in_chunks(step: Callable[..., torch.Tensor], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`step` on consecutive blocks of rows of about CHUNK_ELEMENTS elements (tensors without the term's rows, a
    scale of one row say, whole); the largest of the blocks' results."""
    term = tensors[-1]
    rows = term.shape[0] if term.dim() else 1
    per_row = term[0].numel() if term.dim() > 1 else 1
    step_rows = max(1, CHUNK_ELEMENTS * (1 if term.device.type == "cpu" else 16) // per_row)
    scratch = _scratch.get(term.device)
    if scratch is None or scratch.float_buffer.numel() < step_rows * per_row:
        scratch = _scratch[term.device] = ChunkScratch(step_rows * per_row, term.device)
    largest = None
    for start in range(0, rows, step_rows):
        part = [tensor[start:start + step_rows] if tensor.dim() and tensor.shape[0] == rows else tensor
                for tensor in tensors]
        found = _EAGER[step](*part, scratch)
        largest = found if largest is None else torch.maximum(largest, found)
    return largest


class TermFlags:
    """How many terms were not finite and how many were beyond a sum's range: two int64 counters, reduced over the
    ranks with the sum's words."""

    def __init__(self, device: torch.device) -> None:
        self.counts = torch.zeros(2, dtype=torch.int64, device=device)

    def record(self, largest: torch.Tensor, limit: float) -> None:
        """Count one add whose largest term (NaN when a term is NaN) is `largest`, against the sum's `limit`."""
        self.counts[0] += ~torch.isfinite(largest)
        self.counts[1] += largest >= limit

    def not_finite(self) -> bool:
        return bool(self.counts[0])

    def out_of_range(self) -> bool:
        """A term beyond the range (an inf term counts as not finite instead: its score's finiteness check names
        it)."""
        return bool(self.counts[1]) and not self.not_finite()


class FixedPointSum:
    """Σ of non-negative fp32 terms, each truncated to its row's unit, as one integer word per element."""

    def __init__(self, shape: Sequence[int] | int, device: torch.device, samples: int) -> None:
        self.words = torch.zeros(shape, dtype=torch.int64, device=device)
        self.flags = TermFlags(device)
        self.count_bits = max(samples - 1, 0).bit_length()  # ⌈log2 N⌉
        self.scale: torch.Tensor | None = None  # 1 / unit per row (a power of two), set by `set_references`

    @property
    def reference_shape(self) -> tuple[int, ...]:
        """One reference per row: every dimension but the last."""
        return tuple(self.words.shape[:-1])

    def set_references(self, largest: torch.Tensor) -> None:
        """The units, from each row's largest term in the first sample (rows it left at 0 take the largest of all;
        with none at all, 1)."""
        everywhere = largest.max() if largest.numel() else largest.new_zeros(())
        largest = torch.where(largest > 0, largest, torch.where(everywhere > 0, everywhere, 1.0)).float()
        _, exponent = torch.frexp(largest)  # largest < 2^exponent
        power = (SUM_BITS - self.count_bits - HEADROOM_BITS - exponent).clamp(max=LARGEST_SCALE_EXPONENT)
        self.scale = torch.pow(2.0, power.float())[..., None].to(self.words.device)

    def add(self, term: torch.Tensor, index: int | None = None) -> None:
        """Add `term` to the whole sum, or to its slice `index` (one expert's of an experts' matrix)."""
        if self.scale is None:
            raise RuntimeError("FixedPointSum.add before set_references: the units are agreed first")
        words, scale = (self.words, self.scale) if index is None else (self.words[index], self.scale[index])
        self.flags.record(fused(_scaled_add, words, scale, term), 2.0 ** (SUM_BITS - self.count_bits))

    def tensors(self) -> list[torch.Tensor]:
        return [self.words, self.flags.counts]

    def problem(self, name: str) -> str | None:
        """What puts the sum out of range."""
        if self.flags.out_of_range():
            return (f"a per-sample statistic of {name} exceeds 2^{HEADROOM_BITS} times the first sample's largest "
                    "in its row, beyond the fixed-point sums' range; use --accumulate-dtype exact")
        return None

    def value(self) -> torch.Tensor:
        """The fp32 sum, rounded once (NaN where a term was not finite, for the caller's finiteness check)."""
        if self.flags.not_finite():
            return torch.full(self.words.shape, float("nan"), device=self.words.device)
        return self.words.float() / self.scale  # int64 → fp32 rounds once, to nearest; the division is exact


class ExactSum:
    """Σ of non-negative fp32 terms, exactly, as integers: high · 2^-20 + low · 2^-72."""

    def __init__(self, shape: Sequence[int] | int, device: torch.device) -> None:
        self.high = torch.zeros(shape, dtype=torch.int64, device=device)
        self.low = torch.zeros(shape, dtype=torch.int64, device=device)
        self.flags = TermFlags(device)
        self.pending = 0

    def add(self, term: torch.Tensor, index: int | None = None) -> None:
        """Add `term` to the whole sum, or to its slice `index` (one expert's of an experts' matrix)."""
        high, low = (self.high, self.low) if index is None else (self.high[index], self.low[index])
        self.flags.record(fused(_fixed_point_add, high, low, term), LARGEST_TERM)
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
        return [self.high, self.low, self.flags.counts]

    def problem(self, name: str) -> str | None:
        """What puts the sum out of range."""
        if self.flags.out_of_range():
            return (f"a per-sample statistic of {name} reaches {LARGEST_TERM:.3g}, beyond the exact sums' range; "
                    "use --accumulate-dtype float32")
        return None

    def value(self) -> torch.Tensor:
        """The fp32 sum (NaN where a term was not finite, for the caller's finiteness check to name)."""
        if self.flags.not_finite():
            return torch.full(self.high.shape, float("nan"), device=self.high.device)
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

    def problem(self, name: str) -> str | None:
        return None

    def value(self) -> torch.Tensor:
        return self.total


Accumulator = FixedPointSum | ExactSum | RunningSum


def new_accumulator(accumulate_dtype: str, shape: Sequence[int] | int, device: torch.device,
                    model_dtype: torch.dtype, samples: int) -> Accumulator:
    if accumulate_dtype == "fixed":
        return FixedPointSum(shape, device, samples)
    if accumulate_dtype == "exact":
        return ExactSum(shape, device)
    return RunningSum(shape, device, torch.float32 if accumulate_dtype == "float32" else model_dtype)


def agree_on_units(sums: Mapping[str, Accumulator], largest: Mapping[str, torch.Tensor] | None,
                   share: Callable[[torch.Tensor], Any]) -> None:
    """Collective (through `share`, a broadcast from the rank that holds the first sample): every fixed-point sum
    gets its units from `largest` (per name, each row's largest term of the first sample; given on that rank
    only, None elsewhere). One message for all the sums."""
    fixed = {name: total for name, total in sums.items() if isinstance(total, FixedPointSum)}
    if not fixed:
        return
    device = next(iter(fixed.values())).words.device
    sizes = [math.prod(total.reference_shape) for total in fixed.values()]
    flat = (torch.cat([largest[name].float().reshape(-1) for name in fixed]) if largest is not None
            else torch.zeros(sum(sizes)))
    flat = flat.to(distributed.collective_device(device))
    share(flat)
    for (name, total), part in zip(fixed.items(), flat.split(sizes)):
        total.set_references(part.reshape(total.reference_shape).to(device))


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
                           model_dtype: torch.dtype, samples: int) -> tuple[dict[str, Accumulator], torch.dtype]:
    """Per target (scores.config.Target) the accumulator of its statistic over `samples` samples — wandg's
    weight-sized |∂L/∂W| sums (`with_grads`), or wanda's per-column Σ x² —, and the dtype each per-sample term is
    taken in."""
    sums = {target.name: new_accumulator(accumulate_dtype, target.statistic_shape(with_grads), device, model_dtype,
                                         samples) for target in targets}
    compile_if_worth(accumulate_dtype, samples * sum(math.prod(target.statistic_shape(with_grads))
                                                     for target in targets), device)
    return sums, model_dtype if accumulate_dtype == "model" else torch.float32


def take_values(sums: dict[str, Accumulator], keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """Collective: the fp32 value of each sum whose name `keep`s, every accumulator freed as its value is taken
    (values never sit beside all of them); a sum out of range on any rank is an error on every rank."""
    values, problems = {}, []
    for name in list(sums):
        total = sums.pop(name)
        if keep(name):
            problem = total.problem(name)
            if problem is None:
                values[name] = total.value()
            else:
                problems.append(problem)
    distributed.all_ranks_ok(not problems, problems[0] if problems else "")
    return values


def reduce_accumulators_to_owners(accumulators: Sequence[tuple[Accumulator, int]]) -> None:
    """Each accumulator summed over the ranks onto its owner (integer words add exactly, in any order; fixed-point
    words share their units on every rank)."""
    reduce_each_to_owner([(tensor, owner) for accumulator, owner in accumulators for tensor in accumulator.tensors()])
