"""Lisa (Huang et al. 2024, arXiv 2405.18641): bi-state optimization. The steps alternate between an alignment
state (batches of the alignment data, `--safety-data`) and a fine-tuning state (the user's data), and each state's
objective adds the proximal term ρ/2 ‖w − w_switch‖² towards the weights at the last switch between states.

As in the paper's code (git-disl/Lisa): the run starts in the alignment state, 100 alignment and 900 fine-tuning
steps by default (scaled here by `--lisa-steps A,F`), ρ = 1, and no proximal term in the first 10% of the steps.
A user batch planned for an alignment step is skipped, as there (the alignment batch takes its place). Alignment
steps draw successive batches of the alignment data's own shuffled passes (`alignment_index`), as the authors'
iterator does, so every alignment sample is used once per pass. Departures: A, F and the warm-up are counted in
optimizer steps (the authors count micro-batches: the same with no gradient accumulation, the paper's setting), and
the warm-up is 10% of the steps this run takes (of --max-steps where it is given). The term's
gradient ρ (w − w_switch) is added to the gradient before clipping and the optimizer step, on each rank's own ZeRO-3
partitions (fp32 master weights), which is what the term in the loss contributes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from safeneurons.runtime.zero3 import is_partitioned

PAPER_STEPS = (100, 900)
PAPER_RHO = 1.0
WARMUP_FRACTION = 0.1  # of the run's steps, without the proximal term


def aligning(step: int, steps: Sequence[int]) -> bool:
    """Whether optimizer step `step` (from 0) is in the alignment state: the first A of every A + F."""
    alignment, finetuning = steps
    return step % (alignment + finetuning) < alignment


def alignment_index(step: int, steps: Sequence[int]) -> int:
    """How many alignment steps come before optimizer step `step`: the alignment batch it takes is the next one."""
    alignment, finetuning = steps
    cycles, within = divmod(step, alignment + finetuning)
    return cycles * alignment + min(within, alignment)


def _local(param: nn.Parameter) -> torch.Tensor:
    """The fp32 weights this rank updates: its ZeRO-3 master partition, or the parameter itself."""
    if is_partitioned(param):
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(param).detach().float()
    return param.detach().float()


class ProximalTerm:
    """ρ (w − w_switch) added to each trainable parameter's gradient (its local partition under ZeRO-3)."""

    def __init__(self, model: nn.Module, rho: float) -> None:
        self.rho = rho
        self.parameters = [param for param in model.parameters() if param.requires_grad]
        self.anchors: list[torch.Tensor] = []
        self.switch()

    def switch(self) -> None:
        """The weights now become w_switch."""
        self.anchors = [_local(param).clone() for param in self.parameters]

    def add_to_gradients(self) -> None:
        if self.rho == 0:
            return
        for param, anchor in zip(self.parameters, self.anchors):
            pull = self.rho * (_local(param) - anchor)
            if is_partitioned(param):
                from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

                grad = safe_get_local_grad(param)
                if grad is not None:
                    safe_set_local_grad(param, grad + pull.to(grad.device, grad.dtype).view_as(grad))
            elif param.grad is not None:
                param.grad.add_(pull.to(param.grad.dtype).view_as(param.grad))


@dataclass
class LisaState:
    """The run's Lisa bookkeeping: the cycle, the proximal term and when it starts."""

    steps: tuple[int, int]
    proximal: ProximalTerm
    first_proximal_step: int

    @classmethod
    def start(cls, model: nn.Module, steps: tuple[int, int], rho: float, total_steps: int) -> "LisaState":
        return cls(steps, ProximalTerm(model, rho), int(WARMUP_FRACTION * total_steps) + 1)

    def before_step(self, step: int) -> bool:
        """Switch anchors where the state changes; whether step `step` is an alignment step."""
        if step > 0 and aligning(step, self.steps) != aligning(step - 1, self.steps):
            self.proximal.switch()
        return aligning(step, self.steps)

    def micro_batch(self, step: int, micro: int, accumulation: int, aligning_now: bool) -> int:
        """The index of the micro-batch step `step` takes: of the user's plan, or of the alignment data's."""
        return (alignment_index(step, self.steps) if aligning_now else step) * accumulation + micro

    def proximal_active(self, step: int) -> bool:
        return step >= self.first_proximal_step
