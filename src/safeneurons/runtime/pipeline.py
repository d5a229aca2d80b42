"""Point-to-point transfers between pipeline stages (`--shard layers`), the order in which a stage runs its
micro-batches' forward and backward passes, and the layout of stages × replicas.

The world is `replicas` pipelines of `stages` ranks each: rank = replica × stages + stage. A replica's stages pass
its micro-batches along; the ranks of one stage in every replica sum their statistics onto replica 0's.

Every stage knows each micro-batch's shape (the samples are the same on every rank), so a transfer is the tensor
alone. Sends are asynchronous, receives block: a stage runs ahead by as many micro-batches as its schedule lets
it. Activations flow to stage + 1, gradients to stage − 1, and generation's next tokens from the last stage to
every other; within each direction the messages between two stages keep their order, so no tags are needed.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from safeneurons.errors import SafeneuronsError
from safeneurons.runtime.distributed import local_world_size, rank, world_size


def pipeline_layout(stages: int | None) -> tuple[int, int, int, int]:
    """(stage, stages, replica, replicas) of this rank for `stages` stages (None: one per rank of a node)."""
    stages = stages or local_world_size()
    if stages < 1 or world_size() % stages:
        raise SafeneuronsError(f"--stages {stages}: expected a positive divisor of the {world_size()} ranks "
                               f"(stages × replicas)")
    return rank() % stages, stages, rank() // stages, world_size() // stages


def replica_group(stages: int, replicas: int) -> Any:
    """Collective: the process group of this rank's stage across the replicas (None with one replica). Every
    rank creates every stage's group, in stage order, as torch.distributed requires."""
    if replicas == 1:
        return None
    groups = [dist.new_group([stage + replica * stages for replica in range(replicas)]) for stage in range(stages)]
    return groups[rank() % stages]


def sum_over_replicas(tensors: Sequence[torch.Tensor], group: Any, stage: int) -> None:
    """Each tensor summed over this stage's replicas onto replica 0's rank (= `stage`), in place there."""
    if group is None:
        return
    pending = [dist.reduce(tensor, dst=stage, op=dist.ReduceOp.SUM, group=group, async_op=True)
               for tensor in tensors]
    for work in pending:
        work.wait()


def broadcast_over_replicas(tensor: torch.Tensor, group: Any, stage: int) -> None:
    """Replica 0's `tensor` (on rank `stage`) on every replica's rank of the stage, in place."""
    if group is not None:
        dist.broadcast(tensor, src=stage, group=group)


def one_forward_one_backward(stage: int, stages: int, count: int) -> list[tuple[str, int]]:
    """1F1B: a stage first runs `stages − stage − 1` forwards (the micro-batches in flight below it), then
    alternates one forward with one backward, then the remaining backwards. ("F", i) and ("B", i) in order."""
    warmup = min(stages - stage - 1, count)
    order = [("F", index) for index in range(warmup)]
    for index in range(warmup, count):
        order += [("F", index), ("B", index - warmup)]
    return order + [("B", index) for index in range(count - warmup, count)]


class StageLink:
    """This rank's sends and receives as stage `stage` of the pipeline over ranks first..first + stages − 1."""

    def __init__(self, stage: int, stages: int, device: torch.device, first: int = 0) -> None:
        self.stage, self.stages, self.device, self.first = stage, stages, device, first
        self.pending: list[Any] = []  # (work, tensor): a tensor stays alive until its send completes

    def _send(self, tensor: torch.Tensor, peer: int) -> None:
        tensor = tensor.detach().contiguous()
        self.pending = [(work, kept) for work, kept in self.pending if not work.is_completed()]
        self.pending.append((dist.isend(tensor, peer), tensor))

    def _receive(self, shape: tuple[int, ...], dtype: torch.dtype, peer: int) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(tensor, peer)
        return tensor

    def send_activation(self, hidden: torch.Tensor) -> None:
        self._send(hidden, self.first + self.stage + 1)

    def receive_activation(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._receive(shape, dtype, self.first + self.stage - 1)

    def send_gradient(self, grad: torch.Tensor) -> None:
        self._send(grad, self.first + self.stage - 1)

    def receive_gradient(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._receive(shape, dtype, self.first + self.stage + 1)

    def send_to_every_stage(self, tensor: torch.Tensor) -> None:
        """From the last stage to each of the others (generation's next tokens)."""
        for stage in range(self.stages - 1):
            self._send(tensor, self.first + stage)

    def receive_from_last_stage(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._receive(shape, dtype, self.first + self.stages - 1)

    def finish(self) -> None:
        """Wait for every send (before the tensors are freed or the process group goes)."""
        for work, _tensor in self.pending:
            work.wait()
        self.pending.clear()
