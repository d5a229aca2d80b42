"""The sizes of wandg's accumulators: pure arithmetic (no torch), shared by scoring (scores.accumulators) and
`plan`."""
from __future__ import annotations

ACCUMULATE_DTYPES = ("fixed", "exact", "float32", "model")
AUTO_MEMORY_FRACTION = 0.5  # of what a rank can still allocate, for wandg's accumulators by default


def element_bytes(accumulate_dtype: str, weight_bytes: int) -> int:
    """Bytes one accumulated element takes (wandg's sums are weight-sized), for weights of `weight_bytes`."""
    return {"fixed": 8, "exact": 16, "float32": 4}.get(accumulate_dtype, weight_bytes)


def owned_bytes(element_size: int) -> int:
    """Bytes per element of a finished sum (an fp32 value, or the model's dtype under `model`), which the owner
    keeps after its round while the accumulators are freed."""
    return min(4, element_size)
