"""Wall-clock and CPU time of this process since a point. Costs are compared in CPU time: other load on a shared
machine stretches wall-clock time (one arm measured 66.98× and 1.43× plain's under and without load) but barely
moves the CPU time the work itself takes."""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Stopwatch:
    wall_start: float = field(default_factory=time.perf_counter)
    cpu_start: float = field(default_factory=time.process_time)

    def seconds(self) -> float:
        return time.perf_counter() - self.wall_start

    def cpu_seconds(self) -> float:
        """This process's CPU time (all its threads) since the start."""
        return time.process_time() - self.cpu_start
