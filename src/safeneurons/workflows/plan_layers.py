"""`plan`'s layer-sharded score and eval stages (`--shard layers`, models.blocks): one block of decoder layers per
GPU, the split `score` uses (balanced by parameters, the embeddings on the first block, the head on the last).

Score, per stage: its block's bf16 weights; the activations of its layers for the micro-batches in flight (1F1B:
stage s holds up to `stages − s` of them); its own Linears' wandg sums, in rounds only when they exceed the
budget. No GPU holds another block's weights or sums, so the question is whether the largest stage fits in one
pass. Eval, per stage: the weights; the KV caches of its layers for the wave's batches in flight (one per stage),
grown to the last new token; one batch's forward (and on the last stage a perplexity batch's logits).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from safeneurons.models.layer_split import LayerSplit, balanced_split
from safeneurons.runtime.memory import GIB
from safeneurons.scores.sizes import AUTO_MEMORY_FRACTION


@dataclass(frozen=True)
class ShardedStage:
    """One GPU's share of layer-sharded scoring, in bytes."""

    layers: range
    weights: int
    activations: int
    sums: int
    rounds: int  # times the passes run for this stage's sums (every stage runs the largest count)

    @property
    def total(self) -> int:
        """Weights, activations and one round of sums (a round holds the sums it fills)."""
        return self.weights + self.activations + math.ceil(self.sums / self.rounds)


@dataclass(frozen=True)
class ShardedInputs:
    """What plan knows of the model and the GPUs (workflows.plan fills it from its shapes and formulas)."""

    layer_params: list[int]
    first_params: int  # the embeddings
    last_params: int  # the final norm and the head (a tied head's copy)
    scored_per_layer: int
    stages: int
    weight_bytes: int  # per parameter (bf16)
    sum_bytes: int  # per scored weight (wandg's --accumulate-dtype)
    usable: int  # bytes of a GPU a plan may count on
    budget: int | None  # --score-memory, or None for score's auto budget
    block_activations: Callable[[int], int]  # one micro-batch's activations for a block of n layers
    block_generation: Callable[[int, bool], int]  # eval's caches and working set for n layers (on the last stage)
    block_circuit: Callable[[range, bool], int] = lambda layers, last: 0  # circuit's working set for these layers

    def split(self) -> LayerSplit:
        """The blocks `--shard layers` loads (models.blocks.balanced_split)."""
        return balanced_split(self.layer_params, self.first_params, self.last_params, self.stages)


def sharded_score_stages(inputs: ShardedInputs) -> list[ShardedStage]:
    split = inputs.split()
    found = []
    for stage in range(split.stages):
        layers = split.block(stage)
        weights = inputs.weight_bytes * split.params[stage]
        activations = (split.stages - stage) * inputs.block_activations(len(layers))  # micro-batches in flight
        sums = inputs.sum_bytes * inputs.scored_per_layer * len(layers)
        budget = inputs.budget  # else as `score`: half of what is free when scoring starts
        budget = budget if budget is not None else max(int(AUTO_MEMORY_FRACTION * (
            inputs.usable - weights - activations)), 1)
        found.append(ShardedStage(layers, weights, activations, sums, max(1, math.ceil(sums / budget))))
    return found


def sharded_score_report(inputs: ShardedInputs) -> dict:
    """The blocks, the largest stage, the passes every stage runs and whether the largest fits its GPU."""
    stages = sharded_score_stages(inputs)
    largest = max(stages, key=lambda stage: stage.total)
    return {"stages": len(stages), "blocks": [[stage.layers.start, stage.layers.stop] for stage in stages],
            "largest_gib": {"weights": largest.weights / GIB, "activations": largest.activations / GIB,
                            "sums": largest.sums / GIB, "total": largest.total / GIB},
            "passes": max(stage.rounds for stage in stages), "fits": largest.total <= inputs.usable}


def sharded_eval_report(inputs: ShardedInputs) -> dict:
    """The largest stage of layer-sharded evaluation and whether it fits its GPU."""
    split = inputs.split()
    totals = [(inputs.weight_bytes * split.params[stage], inputs.block_generation(len(split.block(stage)),
                                                                                   stage == split.stages - 1))
              for stage in range(split.stages)]
    weights, working = max(totals, key=sum)
    return {"largest_gib": {"weights": weights / GIB, "caches_and_activations": working / GIB,
                            "total": (weights + working) / GIB}, "fits": weights + working <= inputs.usable}


def sharded_circuit_report(inputs: ShardedInputs) -> dict:
    """The largest stage of the layer-sharded circuit study and whether it fits its GPU."""
    split = inputs.split()
    totals = [(inputs.weight_bytes * split.params[stage], inputs.block_circuit(split.block(stage),
                                                                               stage == split.stages - 1))
              for stage in range(split.stages)]
    weights, working = max(totals, key=sum)
    return {"largest_gib": {"weights": weights / GIB, "working": working / GIB, "total": (weights + working) / GIB},
            "fits": weights + working <= inputs.usable}


def sharded_circuit_line(report: dict) -> str:
    largest = report["largest_gib"]
    return (f"circuit --shard layers: largest stage {largest['total']:.1f} GiB = weights {largest['weights']:.1f} + "
            f"a batch of patched rows with the nodes' differences from below, or EAP-IG's backward "
            f"{largest['working']:.1f} GiB{'' if report['fits'] else ' (does NOT fit)'}")


def sharded_eval_line(report: dict) -> str:
    largest = report["largest_gib"]
    return (f"eval --shard layers: largest stage {largest['total']:.1f} GiB = weights {largest['weights']:.1f} + KV "
            f"caches of the batches in flight and a batch's forward {largest['caches_and_activations']:.1f} GiB"
            f"{'' if report['fits'] else ' (does NOT fit)'}")


def sharded_score_line(report: dict, accumulate_dtype: str) -> str:
    largest, passes = report["largest_gib"], report["passes"]
    blocks = ", ".join(f"{start}-{stop - 1}" for start, stop in report["blocks"])
    held = largest["total"] - largest["weights"] - largest["activations"]  # the sums of one round
    sums = (f"wandg {accumulate_dtype} sums {held:.1f} GiB" if passes == 1 else
            f"one round's wandg {accumulate_dtype} sums {held:.1f} GiB (of {largest['sums']:.1f} GiB in all, in "
            f"{passes} rounds)")
    return (f"score --shard layers: {report['stages']} stages (layers {blocks}); largest stage {largest['total']:.1f} "
            f"GiB = weights {largest['weights']:.1f} + activations {largest['activations']:.1f} + {sums}: "
            f"{'one pass' if passes == 1 else f'{passes} passes'} over the data"
            f"{'' if report['fits'] else ' (does NOT fit)'}")
