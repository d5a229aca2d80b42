"""The data schedule of a fine-tune: micro-batches per rank and step, and the learning-rate schedule."""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch

from safeneurons.finetune.config import SAFETY_SEED_OFFSET

if TYPE_CHECKING:
    from safeneurons.finetune.config import FineTuneConfig


def micro_batch_plan(n_samples: int, config: FineTuneConfig, world: int, rank: int) -> list[list[int]]:
    """Sample indices of this rank's micro-batches for the whole run.

    Each epoch is a permutation drawn with `seed + epoch`, cut into global micro-batches of batch_size × world
    samples (rank r takes the r-th block); the epoch is padded, wrapping round the permutation, to a whole
    number of optimizer steps so every rank sees full batches. Depends only on (samples, config, world), which
    is what makes a resumed run see exactly the batches an uninterrupted run would."""
    per_micro = config.batch_size * world
    micro_per_epoch = micro_batches_per_epoch(n_samples, config, world)
    plan: list[list[int]] = []
    for epoch in range(config.num_epochs):
        order = torch.randperm(n_samples, generator=torch.Generator().manual_seed(config.seed + epoch))
        needed = micro_per_epoch * per_micro
        order = order.repeat(math.ceil(needed / n_samples))[:needed].tolist()
        for micro in range(micro_per_epoch):
            start = micro * per_micro + rank * config.batch_size
            plan.append(order[start:start + config.batch_size])
    return plan


def micro_batches_per_epoch(n_samples: int, config: FineTuneConfig, world: int) -> int:
    micro = math.ceil(n_samples / (config.batch_size * world))
    return math.ceil(micro / config.gradient_accumulation_steps) * config.gradient_accumulation_steps


def planned_steps(n_samples: int, config: FineTuneConfig, world: int) -> int:
    """Optimizer steps of the whole plan: the length of the learning-rate schedule. `max_steps` stops a run early
    without changing its schedule, so a run stopped there and resumed equals the uninterrupted one."""
    return micro_batches_per_epoch(n_samples, config, world) * config.num_epochs // config.gradient_accumulation_steps


def safety_batch_plan(n_safety: int, micro_batches: int, config: FineTuneConfig, world: int,
                      rank: int) -> list[list[int]]:
    """Safety-data micro-batches, one per training micro-batch: the same epoch scheme over the safety samples
    (with their own seed), repeated for as many epochs as the training plan needs."""
    epochs = math.ceil(micro_batches / micro_batches_per_epoch(n_safety, config, world))
    return micro_batch_plan(n_safety, dataclasses.replace(config, num_epochs=epochs,
                                                          seed=config.seed + SAFETY_SEED_OFFSET), world, rank)


def make_scheduler(optimizer: torch.optim.Optimizer, config: FineTuneConfig, total_steps: int) -> Any:
    """transformers' schedule over `total_steps` optimizer steps, warm-up from `--warmup-steps/--warmup-ratio`."""
    from transformers import get_scheduler

    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    return get_scheduler(scheduler_name(config, bool(warmup)), optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps)


def scheduler_name(config: FineTuneConfig, warmup: bool) -> str:
    """transformers' name of `--lr-scheduler`: `constant` with warm-up is `constant_with_warmup`."""
    return "constant_with_warmup" if config.lr_scheduler == "constant" and warmup else config.lr_scheduler
