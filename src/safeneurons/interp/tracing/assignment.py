"""The linear assignment between two models' neurons (lap's LAPJV or scipy) and its distance matrix."""
from __future__ import annotations

import logging
import math
from typing import Iterable, Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from safeneurons.errors import SafeneuronsError

log = logging.getLogger(__name__)

KINDS = ("gate", "up")
SOLVERS = ("auto", "lap", "scipy")
DISTANCE_DTYPES = (torch.float32, torch.float64)
DEFAULT_ALPHA = 1e-5
DEFAULT_DATA = "demo-harmless,demo-utility"
DEFAULT_BATCH_SIZE = 8
# A p-value of exactly 0 (identical permutations) is drawn at -log10 of the smallest positive double.
NEG_LOG10_CAP = -math.log10(np.finfo(np.float64).tiny)

TokenInputs = torch.Tensor | Iterable[torch.Tensor] | Iterable[Mapping[str, torch.Tensor]]


def resolve_solver(solver: str) -> str:
    """`auto` is `lap` (LAPJV, measured faster than scipy on dense cost matrices: bench/bench_tracing.py) when the
    package is installed, else scipy's `linear_sum_assignment`."""
    if solver not in SOLVERS:
        raise SafeneuronsError(f"solver {solver!r} is not one of {', '.join(SOLVERS)}")
    if solver == "scipy":
        return solver
    try:
        import lap  # noqa: F401
    except ImportError:
        if solver == "lap":
            raise SafeneuronsError("solver 'lap' needs the lap package: pip install lap") from None
        return "scipy"
    return "lap"


def solve_assignment(cost: np.ndarray, solver: str = "auto") -> np.ndarray:
    """For each row of `cost` (no more rows than columns), its column in the minimum-cost one-to-one assignment."""
    if cost.shape[0] > cost.shape[1]:
        raise SafeneuronsError(f"cost matrix {cost.shape} has more rows than columns; transpose it")
    cost = np.ascontiguousarray(cost, dtype=np.float64)
    if resolve_solver(solver) == "lap":
        import lap

        _, columns, _ = lap.lapjv(cost, extend_cost=cost.shape[0] != cost.shape[1])
        return np.asarray(columns, dtype=np.int64)
    _, columns = linear_sum_assignment(cost)
    return np.asarray(columns, dtype=np.int64)


def pairwise_sq_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between the rows of `x` [n, d] and of `y` [m, d], in their (shared) dtype."""
    return (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * (x @ y.T)


def match_wmats(wmat0: torch.Tensor | np.ndarray, wmat1: torch.Tensor | np.ndarray, solver: str = "auto",
                dtype: torch.dtype = torch.float64, device: str | torch.device | None = None) -> np.ndarray:
    """Match the rows of `wmat0` [n0, d] to the rows of `wmat1` [n1, d] with the least total squared Euclidean
    distance (the paper's criterion), distances computed in `dtype` (float64, or float32) on `device` (default:
    `wmat0`'s). Returns `perm` of length n0 such that `wmat1[perm]` matches `wmat0`; when n0 > n1 the n0 - n1 rows
    of `wmat0` left without a partner get -1."""
    if dtype not in DISTANCE_DTYPES:
        raise SafeneuronsError(f"distance dtype {dtype} loses precision; use torch.float32 or torch.float64")
    x, y = torch.as_tensor(wmat0), torch.as_tensor(wmat1)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise SafeneuronsError(f"match_wmats needs two matrices with the same number of columns, got "
                               f"{tuple(x.shape)} and {tuple(y.shape)}")
    device = torch.device(device) if device is not None else x.device
    x, y = x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)
    if x.shape[0] <= y.shape[0]:
        return solve_assignment(pairwise_sq_distances(x, y).cpu().double().numpy(), solver)
    columns = solve_assignment(pairwise_sq_distances(y, x).cpu().double().numpy(), solver)
    perm = np.full(x.shape[0], -1, dtype=np.int64)
    perm[columns] = np.arange(y.shape[0])
    return perm
