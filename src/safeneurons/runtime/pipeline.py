"""Point-to-point transfers between pipeline stages (`--shard layers`), and the order in which a stage runs its
micro-batches' forward and backward passes.

Every stage knows each micro-batch's shape (the samples are the same on every rank), so a transfer is the tensor
alone. Sends are asynchronous, receives block: a stage runs ahead by as many micro-batches as its schedule lets
it. Activations flow to stage + 1 and gradients to stage − 1; within each direction the messages between two
stages keep their order, so no tags are needed.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def one_forward_one_backward(stage: int, stages: int, count: int) -> list[tuple[str, int]]:
    """1F1B: a stage first runs `stages − stage − 1` forwards (the micro-batches in flight below it), then
    alternates one forward with one backward, then the remaining backwards. ("F", i) and ("B", i) in order."""
    warmup = min(stages - stage - 1, count)
    order = [("F", index) for index in range(warmup)]
    for index in range(warmup, count):
        order += [("F", index), ("B", index - warmup)]
    return order + [("B", index) for index in range(count - warmup, count)]


class StageLink:
    """This rank's sends and receives as stage `stage` of a pipeline over ranks 0..stages−1."""

    def __init__(self, stage: int, stages: int, device: torch.device) -> None:
        self.stage, self.stages, self.device = stage, stages, device
        self.pending: list[Any] = []  # (work, tensor): a tensor stays alive until its send completes
        self.sent_bytes = 0

    def _send(self, tensor: torch.Tensor, peer: int) -> None:
        tensor = tensor.detach().contiguous()
        self.pending = [(work, kept) for work, kept in self.pending if not work.is_completed()]
        self.pending.append((dist.isend(tensor, peer), tensor))
        self.sent_bytes += tensor.numel() * tensor.element_size()

    def _receive(self, shape: tuple[int, ...], dtype: torch.dtype, peer: int) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(tensor, peer)
        return tensor

    def send_activation(self, hidden: torch.Tensor) -> None:
        self._send(hidden, self.stage + 1)

    def receive_activation(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._receive(shape, dtype, self.stage - 1)

    def send_gradient(self, grad: torch.Tensor) -> None:
        self._send(grad, self.stage - 1)

    def receive_gradient(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._receive(shape, dtype, self.stage + 1)

    def finish(self) -> None:
        """Wait for every send (before the tensors are freed or the process group goes)."""
        for work, _tensor in self.pending:
            work.wait()
        self.pending.clear()
