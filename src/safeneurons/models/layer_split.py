"""Splitting decoder layers into contiguous blocks balanced by parameters: pure arithmetic (no torch), shared by
the layer-sharded stages (models.blocks) and `plan`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from safeneurons.errors import SafeneuronsError


@dataclass(frozen=True)
class LayerSplit:
    """Decoder layers [starts[s], starts[s + 1]) are stage s's; `params` the parameters each stage holds."""

    starts: tuple[int, ...]
    params: tuple[int, ...]

    @property
    def stages(self) -> int:
        return len(self.starts) - 1

    def block(self, stage: int) -> range:
        return range(self.starts[stage], self.starts[stage + 1])

    def stage_of(self, layer: int) -> int:
        return next(stage for stage in range(self.stages) if layer < self.starts[stage + 1])

    def to_json(self) -> dict[str, Any]:
        return {"stages": self.stages, "blocks": [[block.start, block.stop] for block in map(self.block,
                range(self.stages))], "params": list(self.params)}


def balanced_split(layer_params: Sequence[int], first_extra: int, last_extra: int, stages: int) -> LayerSplit:
    """Contiguous non-empty blocks minimising the largest stage's parameters (exact, by dynamic programming over
    the cut points; ties go to the earliest cuts)."""
    layers = len(layer_params)
    if not 1 <= stages <= layers:
        raise SafeneuronsError(f"--shard layers over {stages} ranks: the model has {layers} decoder layers; expected "
                               f"at most one stage per layer")
    prefix = [0]
    for count in layer_params:
        prefix.append(prefix[-1] + count)

    def cost(start: int, stop: int, stage: int) -> int:
        extra = (first_extra if stage == 0 else 0) + (last_extra if stage == stages - 1 else 0)
        return prefix[stop] - prefix[start] + extra

    # best[s][i]: the least largest stage for layers [0, i) over stages 0..s−1; cut[s][i] where the last began
    best = [[None] * (layers + 1) for _ in range(stages + 1)]
    cut = [[0] * (layers + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for stage in range(1, stages + 1):
        for stop in range(stage, layers - (stages - stage) + 1):
            for start in range(stage - 1, stop):
                if best[stage - 1][start] is None:
                    continue
                value = max(best[stage - 1][start], cost(start, stop, stage - 1))
                if best[stage][stop] is None or value < best[stage][stop]:
                    best[stage][stop], cut[stage][stop] = value, start
    starts = [layers]
    for stage in range(stages, 0, -1):
        starts.append(cut[stage][starts[-1]])
    starts.reverse()
    return LayerSplit(tuple(starts), tuple(cost(starts[s], starts[s + 1], s) for s in range(stages)))
