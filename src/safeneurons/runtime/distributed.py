"""One way to start, whatever the launcher: torchrun, deepspeed, accelerate, mpirun, srun, or a plain process.

Rank and world size always come from `torch.distributed` once it is initialised (accelerate on CPU with
DeepSpeed reports `process_index` 0 on every rank). Rank 0 alone shows progress and writes files; the other
ranks log warnings and errors with their rank in front.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from safeneurons.errors import SafeneuronsError
from safeneurons.runtime.launch import discover_launch, setup_logging

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _mpi_rendezvous(port: int | None) -> tuple[str, int]:
    """Under mpirun nobody sets MASTER_ADDR: rank 0 tells the others its host name (and a free port) over MPI."""
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise SafeneuronsError("started by mpirun without MASTER_ADDR: install the `mpi` extra (mpi4py) "
                               "or export MASTER_ADDR and MASTER_PORT") from error
    comm = MPI.COMM_WORLD
    mine = (socket.gethostname(), port or free_port()) if comm.Get_rank() == 0 else None
    return comm.bcast(mine, root=0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timeout_from_env() -> datetime.timedelta:
    """Collectives give up after SAFENEURONS_TIMEOUT seconds (default 1800) so a dead rank ends the job."""
    return datetime.timedelta(seconds=float(os.environ.get("SAFENEURONS_TIMEOUT", "1800")))


def init_distributed(require_process_group: bool = False) -> DistContext:
    """Start (or join) the process group described by the environment and return this process's context.

    A single process gets no process group unless `require_process_group` (DeepSpeed needs one even then).
    The standard variables are exported so that DeepSpeed and accelerate see the same job.
    """
    info = discover_launch()
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", info.local_rank % max(torch.cuda.device_count(), 1)) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized() and (info.world_size > 1 or require_process_group):
        master, port = info.master_addr, info.master_port
        if info.launcher == "single" and "MASTER_PORT" not in os.environ:
            port = free_port()
        elif master is None:  # mpirun
            master, port = _mpi_rendezvous(info.master_port if "MASTER_PORT" in os.environ else None)
        os.environ.update({"RANK": str(info.rank), "WORLD_SIZE": str(info.world_size),
                           "LOCAL_RANK": str(info.local_rank), "MASTER_ADDR": master, "MASTER_PORT": str(port)})
        dist.init_process_group(backend=backend, init_method="env://", rank=info.rank,
                                world_size=info.world_size, timeout=timeout_from_env())
    if dist.is_initialized():
        backend = dist.get_backend()
    else:
        backend = None
    context = DistContext(rank(), world_size(), info.local_rank, device, backend, info.launcher)
    setup_logging(context.rank)
    return context


def describe_launch() -> list[dict[str, Any]] | None:
    """Collective: how every rank sees this launch (rank, world size, host, device, backend, launcher), on rank 0
    in rank order; None elsewhere."""
    context = init_distributed()
    return gather_to_main({"rank": context.rank, "world_size": context.world_size, "local_rank": context.local_rank,
                           "host": socket.gethostname(), "device": str(context.device), "backend": context.backend,
                           "launcher": context.launcher})


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def local_world_size() -> int:
    """Ranks sharing this node (torchrun, mpirun, srun); the whole world when the launcher does not say."""
    for key in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(key, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return world_size()


def available_memory(device: torch.device) -> int:
    """Bytes this rank may still allocate: free memory of its GPU, or its share of the node's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024 // local_world_size()


def assign_round_robin(n_items: int, rank_: int | None = None, world: int | None = None) -> list[int]:
    """Indices of the items (layers, prompts, sites) this rank works on: rank, rank + W, rank + 2W, …"""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    return list(range(rank_, n_items, world))


def owner_of(index: int, world: int | None = None) -> int:
    """The rank that `assign_round_robin` gives item `index` to."""
    return index % (world_size() if world is None else world)


def gather_to_main(obj: T) -> list[T] | None:
    """Every rank's `obj` on rank 0, in rank order; None on the other ranks."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] | None = [None] * dist.get_world_size() if is_main() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def all_gather(obj: T) -> list[T]:
    """Every rank's `obj` on every rank, in rank order."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def merge_dicts_to_main(partial: Mapping[Any, T]) -> dict[Any, T] | None:
    """Union of per-rank dictionaries (for example layer index → result) on rank 0."""
    parts = gather_to_main(dict(partial))
    if parts is None:
        return None
    merged: dict[Any, T] = {}
    for part in parts:
        merged.update(part)
    return merged


def broadcast_from_main(obj: T) -> T:
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_ranks_ok(ok: bool, message: str = "") -> None:
    """Raise on every rank if any rank failed, with the first failing rank's message, so no rank hangs."""
    reports = all_gather((ok, message))
    for index, (rank_ok, rank_message) in enumerate(reports):
        if not rank_ok:
            raise SafeneuronsError(f"rank {index}: {rank_message}" if len(reports) > 1 else rank_message)


def progress(iterable: Iterable[T], **kwargs: Any) -> Iterable[T]:
    """A tqdm bar on rank 0 only."""
    return tqdm(iterable, disable=not is_main() or kwargs.pop("disable", False), **kwargs)


def shutdown(synchronize: bool = False) -> None:
    """Destroy the process group; after a run that finished on this rank, first wait for the others, so that no
    rank tears its connections down while another still uses them."""
    if dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def split_evenly(items: Sequence[T], rank_: int | None = None, world: int | None = None) -> list[T]:
    """This rank's share of `items` (round-robin), for prompts and samples."""
    return [items[index] for index in assign_round_robin(len(items), rank_, world)]


# ---------------------------------------------------------------- collectives of values, tensors and work

def mean_over_ranks(values: Sequence[float]) -> float:
    """The mean of every rank's mean of `values` (each rank has the same count)."""
    return reduce_over_ranks(sum(values) / len(values)) / world_size()


def reduce_over_ranks(value: float, op: str = "sum") -> float:
    """`value` summed ("sum") or maximised ("max") over all ranks; as it is without a process group."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return float(tensor.item())


def grouped_batches(indices: Sequence[int], batch_size: int, groups: Sequence[Any] | None = None) -> list[list[int]]:
    """The items in batches of at most `batch_size`; with `groups` (one key per item) sorted by group, a batch
    never mixing two."""
    ordered = sorted(indices, key=lambda index: groups[index]) if groups is not None else list(indices)
    batches: list[list[int]] = []
    for index in ordered:
        if batches and (groups is None or groups[batches[-1][-1]] == groups[index]) and len(batches[-1]) < batch_size:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def map_over_ranks(n_items: int, batch_size: int, run_batch: Callable[[list[int]], list[Any]],
                   desc: str, groups: Sequence[int] | None = None) -> list[Any]:
    """`run_batch` over the items, split across ranks in batches and gathered on every rank in item order; with
    `groups` (one key per item) a batch never mixes groups. Every rank runs the same number of batches (an empty
    one when it has none left), as ZeRO-3 requires."""
    batches = grouped_batches(assign_round_robin(n_items), batch_size, groups)
    n_steps = max(all_gather(len(batches)))
    local: dict[int, Any] = {}
    for step in progress(range(n_steps), desc=desc):
        batch = batches[step] if step < len(batches) else []
        local.update(zip(batch, run_batch(batch)))
    merged: dict[int, Any] = {}
    for part in all_gather(local):
        merged.update(part)
    return [merged[index] for index in range(n_items)]


def map_fixed_batches(n_items: int, batch_size: int, run_batch: Callable[[list[int]], list[Any]],
                      desc: str) -> list[Any]:
    """`run_batch` over fixed batches of consecutive items (0..B-1, B..2B-1, …), the batches dealt round-robin to the
    ranks, the results gathered on every rank in item order. Each batch is the same at any rank count, so results
    that depend on a batch's padding do not depend on the number of ranks. A rank out of batches runs the first
    one again and drops it (every rank makes the same passes, as ZeRO-3 requires)."""
    batches = [list(range(start, min(start + batch_size, n_items))) for start in range(0, n_items, batch_size)]
    mine = batches[rank()::world_size()]
    local: dict[int, Any] = {}
    for step in progress(range(-(-len(batches) // world_size())), desc=desc):
        if step < len(mine):
            local.update(zip(mine[step], run_batch(mine[step])))
        else:
            run_batch(batches[0])
    merged: dict[int, Any] = {}
    for part in all_gather(local):
        merged.update(part)
    return [merged[index] for index in range(n_items)]


def reduce_to_owner(tensor: torch.Tensor, owner: int) -> torch.Tensor | None:
    """Sum of `tensor` over the ranks, on `owner` only (None elsewhere)."""
    if world_size() > 1:
        dist.reduce(tensor, dst=owner, op=dist.ReduceOp.SUM)
    return tensor if rank() == owner else None


def reduce_each_to_owner(tensors: Sequence[tuple[torch.Tensor, int]]) -> None:
    """Sum each tensor over the ranks onto its owner, in place there; the reduces are issued together and overlap."""
    if world_size() == 1:
        return
    pending = [dist.reduce(tensor, dst=owner, op=dist.ReduceOp.SUM, async_op=True) for tensor, owner in tensors]
    for work in pending:
        work.wait()


def broadcast_from_owner(tensor: torch.Tensor, owner: int) -> torch.Tensor:
    if world_size() > 1:
        dist.broadcast(tensor, src=owner)
    return tensor


def gather_to_owner(tensor: torch.Tensor, owner: int, group: Any = None) -> list[torch.Tensor] | None:
    """Every rank's `tensor` (same shape on every rank of `group`, default all) on `owner`, in rank order; None
    elsewhere."""
    size = dist.get_world_size(group=group) if dist.is_initialized() else 1
    if size == 1:
        return [tensor] if rank() == owner else None
    parts = [torch.empty_like(tensor) for _ in range(size)] if rank() == owner else None
    dist.gather(tensor, parts, dst=owner, group=group)
    return parts


def collective_device(model_device: torch.device) -> torch.device:
    """Where tensors sent through the process group must live: the model's GPU under NCCL, else the CPU."""
    return model_device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")
