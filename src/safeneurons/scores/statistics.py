"""Per-Linear statistics summed over the samples (wanda's squared input norms, wandg's |dY^T X|),
each reduced once to the rank that owns its layer, in rounds when they do not fit.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from safeneurons.errors import SafeneuronsError
from safeneurons.models.blocks import block_of
from safeneurons.models.structure import model_device, model_dtype
from safeneurons.runtime import distributed
from safeneurons.runtime.zero3 import weight_on_owner
from safeneurons.scores.accumulators import (accumulation_rounds, accumulator_bytes, agree_on_units,
                                             reduce_accumulators_to_owners, score_memory_budget,
                                             statistic_accumulators, take_values)
from safeneurons.scores.sizes import element_bytes
from safeneurons.runtime.distributed import broadcast_from_owner, reduce_each_to_owner
from safeneurons.scores.passes import (ROUTED_TOKENS, LinearCapture, add_sample_terms, first_sample_references,
                                       rank_batches, routed_tokens_key, run_batch, scoring_mode)
from safeneurons.scores.sharded import sharded_statistics

if TYPE_CHECKING:
    from safeneurons.data.examples import Sample
    from safeneurons.scores.config import ScoreConfig, Target
    from safeneurons.scores.passes import Entry, MicroBatch

log = logging.getLogger(__name__)


def collect_statistics(model: nn.Module, targets: Sequence[Target], samples: Sequence[Sample],
                       config: ScoreConfig, entries: Sequence[Entry] | None = None) -> dict[str, torch.Tensor]:
    """Per target, the sum over all samples of Σ x_j² (wanda) or of |∂L_s/∂W| (wandg), on the owner only;
    with `entries` (one per micro-batch) the passes start at their layer.

    Every rank accumulates its own samples locally (`accumulators`) and the sums are reduced to the owners once, as
    data-parallel training reduces gradients: the traffic is one copy of the statistics per rank, whatever the
    number of samples. wandg's accumulators are weight-sized; when all of them do not fit the memory budget
    (`score_memory`), the targets are taken in rounds of consecutive Linears that fit, each round running the
    passes again (its backward stops at the round's lowest Linear). On a layer-sharded model every rank runs
    every sample through its own block of layers instead (scores.sharded)."""
    block = block_of(model)
    if block is not None:
        return sharded_statistics(block, targets, samples, config)
    device = model_device(model)
    batches = rank_batches(samples, config.batch_size, device)
    if config.method != "wandg":
        return _accumulate(model, targets, batches, entries, config, len(samples), with_grads=False)
    size = element_bytes(config.accumulate_dtype, model_dtype(model).itemsize)
    rounds = accumulation_rounds(targets, score_memory_budget(config, device), size)
    if distributed.is_main():
        log.info("wandg: %d accumulator round%s of at most %.2f GiB per rank (%.2f GiB for all %d Linears, %s sums)",
                 len(rounds), "" if len(rounds) == 1 else "s",
                 max(accumulator_bytes(group, size) for group in rounds) / 2**30,
                 accumulator_bytes(targets, size) / 2**30, len(targets), config.accumulate_dtype)
    owned: dict[str, torch.Tensor] = {}
    for group in rounds:
        owned.update(_accumulate(model, group, batches, entries, config, len(samples), with_grads=True))
    return owned


def _accumulate(model: nn.Module, targets: Sequence[Target], batches: Sequence[MicroBatch],
                entries: Sequence[Entry] | None, config: ScoreConfig, samples: int,
                with_grads: bool) -> dict[str, torch.Tensor]:
    """All of this rank's passes over its share of the `samples` samples, each real sample's statistics added to
    `targets`' accumulators (fixed-point sums first agree on their units, from rank 0's first sample: the first of
    all), then one reduce of each accumulator to its owner: the owners get the sums."""
    device, dtype = model_device(model), model_dtype(model)
    capture = LinearCapture(targets, with_grads)
    sums, term_dtype = statistic_accumulators(targets, config.accumulate_dtype, with_grads, device, dtype, samples)
    try:
        with scoring_mode(model):
            for index, batch in enumerate(distributed.progress(batches, desc="wandg passes" if with_grads
                                                               else "wanda passes", leave=False)):
                capture.start(batch)
                run_batch(model, batch, with_grads, None if entries is None else entries[index])
                if index == 0:
                    agree_on_units(sums, first_sample_references(
                        sums, capture.inputs, capture.output_grads, targets, batch, with_grads, term_dtype)
                        if distributed.rank() == 0 else None, lambda flat: broadcast_from_owner(flat, 0))
                for target in targets:
                    add_sample_terms(sums[target.name], capture.inputs, capture.output_grads, target, batch,
                                     with_grads, term_dtype)
    finally:
        capture.close()
    owners = {target.name: target.owner for target in targets}
    reduce_accumulators_to_owners([(sums[target.name], target.owner) for target in targets])
    reduce_each_to_owner([(counts, owners[name]) for name, counts in capture.routed_tokens.items()])
    owned = {routed_tokens_key(name): counts for name, counts in capture.routed_tokens.items()
             if owners[name] == distributed.rank()}
    mine = {target.name for target in targets if target.mine}
    return {**owned, **take_values(sums, mine.__contains__)}


def random_scores(target: Target, seed: int, stream: int) -> torch.Tensor:
    """Uniform scores that depend only on (seed, parameter index, stream), so every world size draws the same."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + target.index * 2 + stream)
    return torch.rand(target.shape, generator=generator)


def score_targets(model: nn.Module, targets: Sequence[Target], samples: Sequence[Sample] | None,
                  config: ScoreConfig, stream: int = 0, entries: Sequence[Entry] | None = None
                  ) -> dict[str, torch.Tensor]:
    """float32 scores of the targets this rank owns, and for each experts' gate_up matrix it owns the response
    tokens each expert received (key `routed_tokens_key(name)`); NaN/inf is an error that names the parameter."""
    if config.method == "random":
        return {target.name: random_scores(target, config.seed, stream) for target in targets if target.mine}
    statistics = collect_statistics(model, targets, samples, config, entries)
    scores: dict[str, torch.Tensor] = {key: counts for key, counts in statistics.items() if key.endswith(ROUTED_TOKENS)}
    problems: list[tuple[int, str]] = []
    for target in targets:
        weight = weight_on_owner(target.weight, target.owner)
        if weight is None:
            continue
        statistic = statistics.pop(target.name)  # freed as we go: scores replace accumulators
        # under --accumulate-dtype model the product too is taken in the model's dtype, as the original code does
        magnitude = weight.abs().to(statistic.dtype)
        if config.method == "wanda":
            score = magnitude * input_norms(target, torch.sqrt(statistic / len(samples)))
        else:
            score = (magnitude * statistic).float()
        if not torch.isfinite(magnitude).all():
            problems.append((0, f"parameter {target.name} has NaN or inf weights; its score is not finite"))
        elif not torch.isfinite(score).all():
            problems.append((1, f"the {config.method} score of parameter {target.name} is not finite "
                                f"(NaN or inf in its activations or gradients)"))
        scores[target.name] = score.cpu()
    raise_first_problem(problems)
    return scores


def input_norms(target: Target, norms: torch.Tensor) -> torch.Tensor:
    """wanda's per-column input norms shaped to multiply the weight: one row [1, in] for a Linear; for an experts'
    matrix each expert's own norms, [E, 1, in], or [E, in, 1] where the matrices are stored transposed."""
    bank = target.linear.experts
    if bank is None:
        return norms.reshape(1, -1)
    return norms[:, :, None] if bank.transposed else norms[:, None, :]


def raise_first_problem(problems: list[tuple[int, str]]) -> None:
    """Collective: raise the most telling problem of any rank (a bad weight before its downstream effects)."""
    reports = [problem for rank_problems in distributed.all_gather(problems) for problem in rank_problems]
    if reports:
        raise SafeneuronsError(min(reports)[1])
