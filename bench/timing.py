"""Side-by-side timing for the benches: the sides run in turn, round after round, and each keeps its best of the
rounds, so a load that comes and goes on a shared machine falls on every side alike."""
from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping


@dataclass
class Timing:
    wall: float
    cpu: float  # process CPU time: steadier than wall time on a machine shared with other jobs
    value: Any = None  # what the side's last run returned


def interleaved(sides: Mapping[Any, Callable[[], Any]], repeats: int) -> dict[Any, Timing]:
    """Each side's shortest wall and CPU times over `repeats` rounds in which every side runs once, in turn
    (progress bars silenced)."""
    best: dict[str, Timing] = {}
    for _ in range(repeats):
        for label, run in sides.items():
            with contextlib.redirect_stderr(io.StringIO()):
                wall, cpu = time.perf_counter(), time.process_time()
                value = run()
                timing = Timing(time.perf_counter() - wall, time.process_time() - cpu, value)
            if label in best:
                timing = Timing(min(timing.wall, best[label].wall), min(timing.cpu, best[label].cpu), value)
            best[label] = timing
    return best
