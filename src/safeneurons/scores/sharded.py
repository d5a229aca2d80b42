"""wanda's and wandg's statistics on a layer-sharded model (`score --shard layers`, models.blocks).

Every stage runs every sample of its replica through its own block of layers, the hidden states passed stage to
stage (and for wandg the gradients back, in 1F1B order), and sums its own Linears' statistics locally: with one
replica each rank already holds the complete sums of its layers, so there is no reduce; with more, a stage's
replicas sum theirs once (exact sums: the same bits as one rank). The passes are repeated only when a rank's own
sums exceed its memory budget. The per-sample terms are those of the unsharded passes, bit for bit.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from safeneurons.runtime import distributed
from safeneurons.runtime.pipeline import (StageLink, broadcast_over_replicas, one_forward_one_backward,
                                          sum_over_replicas)
from safeneurons.scores.accumulators import (accumulation_rounds, agree_on_units, score_memory_budget,
                                             statistic_accumulators, take_values)
from safeneurons.scores.sizes import element_bytes
from safeneurons.scores.passes import (LinearCapture, add_sample_terms, equal_length_groups, first_sample_references,
                                       micro_batch, per_sample_losses, routed_tokens_key, scoring_mode)

if TYPE_CHECKING:
    from safeneurons.data.examples import Sample
    from safeneurons.models.blocks import LayerBlock
    from safeneurons.scores.config import ScoreConfig, Target
    from safeneurons.scores.passes import MicroBatch

log = logging.getLogger(__name__)


def sharded_statistics(block: LayerBlock, targets: Sequence[Target], samples: Sequence[Sample],
                       config: ScoreConfig) -> dict[str, torch.Tensor]:
    """Collective: per Linear of this rank's block, the sum over all samples of Σ x_j² (wanda) or |∂L_s/∂W|
    (wandg), on replica 0's rank of the stage (each replica runs its share of the samples; the stage's replicas
    then sum onto it)."""
    batches = replica_batches(block, samples, config.batch_size)
    local = [target for target in targets if block.split.stage_of(target.linear.layer) == block.stage]
    if config.method != "wandg":
        return _run_passes(block, local, batches, config, len(samples), with_grads=False)
    size = element_bytes(config.accumulate_dtype, block.dtype.itemsize)
    budget = score_memory_budget(config, block.device)  # collective: on every rank, whether it holds targets or not
    rounds = accumulation_rounds(local, budget, size) if local else [[]]
    count = max(distributed.all_gather(len(rounds)))  # every stage runs every round's passes
    log.info("wandg, layer-sharded: stage %d of %d holds layers %d-%d, its sums in %d round%s",
             block.stage, block.split.stages, block.layers.start, block.layers.stop - 1, len(rounds),
             "" if len(rounds) == 1 else "s")
    owned: dict[str, torch.Tensor] = {}
    for index in range(count):
        group = rounds[index] if index < len(rounds) else []
        owned.update(_run_passes(block, group, batches, config, len(samples), with_grads=True))
    return owned


def forward_sweep(block: LayerBlock, batches: Sequence[MicroBatch], before: Callable[[MicroBatch], None]) -> None:
    """Collective over this replica's stages: every micro-batch forward through the pipeline without gradients,
    `before(batch)` called on this stage ahead of each (the hooks' bookkeeping, say ActSVD's response rows)."""
    link = block.link()
    try:
        with scoring_mode(block.model):
            for batch in distributed.progress(batches, desc="pipelined passes", leave=False):
                before(batch)
                _forward(block, batch, link, False)
    finally:
        link.finish()


def replica_batches(block: LayerBlock, samples: Sequence[Sample], batch_size: int) -> list[MicroBatch]:
    """This replica's share of the samples, in the micro-batches of one token count that every stage runs."""
    share = distributed.split_evenly(samples, block.replica, block.replicas)
    return [micro_batch(group, block.device) for group in equal_length_groups(share, batch_size)]


def _run_passes(block: LayerBlock, targets: Sequence[Target], batches: Sequence[MicroBatch], config: ScoreConfig,
                samples: int, with_grads: bool) -> dict[str, torch.Tensor]:
    """One pipelined sweep over the micro-batches of this replica's share of the `samples` samples (forward only,
    or 1F1B forward and backward), each real sample's terms added to this stage's accumulators (fixed-point sums
    first agree on their units, from replica 0's first sample: the first of all)."""
    order = one_forward_one_backward(block.stage, block.split.stages, len(batches)) if with_grads else [
        ("F", index) for index in range(len(batches))]
    sums, term_dtype = statistic_accumulators(targets, config.accumulate_dtype, with_grads, block.device, block.dtype,
                                              samples)
    capture, link = LinearCapture(targets, with_grads), block.link()
    in_flight: dict[int, tuple] = {}
    try:
        with scoring_mode(block.model):
            for kind, index in distributed.progress(order, desc="pipelined passes", leave=False):
                batch = batches[index]
                if kind == "F":
                    capture.start(batch)
                    received, output = _forward(block, batch, link, with_grads)
                    in_flight[index] = (received, output, dict(capture.inputs))
                    if with_grads:
                        continue
                    inputs, grads = in_flight.pop(index)[2], {}
                else:
                    capture.output_grads.clear()
                    received, output, inputs = in_flight.pop(index)
                    _backward(block, received, output, link)
                    grads = capture.output_grads
                if index == 0:
                    agree_on_units(sums, first_sample_references(sums, inputs, grads, targets, batch, with_grads,
                                                                 term_dtype) if block.replica == 0 else None,
                                   lambda flat: broadcast_over_replicas(flat, block.group, block.stage))
                for target in targets:
                    add_sample_terms(sums[target.name], inputs, grads, target, batch, with_grads, term_dtype)
    finally:
        capture.close()
        link.finish()
    sum_over_replicas([tensor for total in sums.values() for tensor in total.tensors()]
                      + list(capture.routed_tokens.values()), block.group, block.stage)
    owned = {routed_tokens_key(name): counts for name, counts in capture.routed_tokens.items()
             if block.replica == 0}
    return {**owned, **take_values(sums, lambda _: block.replica == 0)}


def _forward(block: LayerBlock, batch: MicroBatch, link: StageLink,
             with_grads: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """This stage's layers on one micro-batch: from the tokens (first stage) or the hidden states received; the
    output is sent on, or on the last stage is the loss (wandg) or the final hidden states (wanda)."""
    received = block.receive(link, batch.input_ids.shape)
    if received is not None:
        received.requires_grad_(with_grads)
    with torch.set_grad_enabled(with_grads):
        output = block.run(batch.input_ids, received, head=with_grads, use_cache=False)
    if block.last and with_grads:
        return received, (per_sample_losses(output, batch.labels) * batch.real).sum()
    if not block.last:
        link.send_activation(output)
    return received, output


def _backward(block: LayerBlock, received: torch.Tensor | None, output: torch.Tensor, link: StageLink) -> None:
    """Backward through this stage from the loss (last stage) or the gradient received from the next stage,
    the gradient of the hidden states received then sent back."""
    gradient = None if block.last else link.receive_gradient(tuple(output.shape), output.dtype)
    if output.requires_grad:
        torch.autograd.backward(output, gradient)
    if received is not None:
        link.send_gradient(received.grad if received.grad is not None else torch.zeros_like(received))
