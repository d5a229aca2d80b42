"""Where this process stands in a job, read from the launcher's environment before any process group exists
(torchrun, deepspeed, accelerate, mpirun, srun, or a plain process), and the per-rank log format: no torch, so
that commands doing arithmetic only (`plan`) start at once."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping

from safeneurons.errors import SafeneuronsError

DEFAULT_PORT = 29500
LOG_FORMAT = "%(asctime)s %(rankprefix)s%(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True)
class LaunchInfo:
    """What the environment says about this process's place in the job, before any process group exists."""

    launcher: str  # torchrun (also deepspeed, accelerate), mpirun, srun or single
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int


def _int(environ: Mapping[str, str], key: str, default: int | None = None) -> int:
    value = environ.get(key)
    if value is None:
        if default is None:
            raise SafeneuronsError(f"environment variable {key} is missing")
        return default
    try:
        return int(value)
    except ValueError:
        raise SafeneuronsError(f"environment variable {key}={value!r} is not an integer") from None


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list such as ``gpu[01-03,07],login1`` into host names, in order."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?(?:,|$)", nodelist):
        prefix, ranges = match.group(1), match.group(2)
        if not ranges:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            if not high:
                hosts.append(prefix + low)
                continue
            width = len(low)
            hosts.extend(f"{prefix}{index:0{width}d}" for index in range(int(low), int(high) + 1))
    return hosts


def _slurm_master(environ: Mapping[str, str]) -> str:
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:  # scontrol knows every node-list syntax; the parser below covers the common ones
        first = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               check=True, timeout=30).stdout.split()[0]
        return first
    except (OSError, subprocess.SubprocessError, IndexError):
        return expand_slurm_nodelist(nodelist)[0]


def discover_launch(environ: Mapping[str, str] | None = None) -> LaunchInfo:
    """Read rank, world size and rendezvous address from the variables each launcher sets."""
    env = os.environ if environ is None else environ
    port = _int(env, "MASTER_PORT", DEFAULT_PORT)
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, deepspeed, accelerate launch
        return LaunchInfo("torchrun", _int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK", 0),
                          env.get("MASTER_ADDR", "127.0.0.1"), port)
    for rank_key, size_key, local_key in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
                                          ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
                                          ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK")):
        if rank_key in env and size_key in env:
            return LaunchInfo("mpirun", _int(env, rank_key), _int(env, size_key), _int(env, local_key, 0),
                              env.get("MASTER_ADDR"), port)
    if "SLURM_PROCID" in env and _int(env, "SLURM_NTASKS", 1) > 1:
        job_port = 10000 + _int(env, "SLURM_JOB_ID", 0) % 50000
        return LaunchInfo("srun", _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), _int(env, "SLURM_LOCALID", 0),
                          env.get("MASTER_ADDR") or _slurm_master(env), _int(env, "MASTER_PORT", job_port))
    return LaunchInfo("single", 0, 1, 0, "127.0.0.1", port)


class _RankPrefix(logging.Filter):
    def __init__(self, rank_: int) -> None:
        super().__init__()
        self.prefix = f"[rank {rank_}] " if rank_ else ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rankprefix = self.prefix
        return True


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (tools and tests replace it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(rank_: int | None = None, level: int = logging.INFO) -> None:
    """Rank 0 logs at `level`; the other ranks only warnings and errors, with their rank in front."""
    rank_ = discover_launch().rank if rank_ is None else rank_
    logger = logging.getLogger("safeneurons")
    logger.handlers.clear()
    handler = _CurrentStderr()
    handler.addFilter(_RankPrefix(rank_))
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level if rank_ == 0 else logging.WARNING)
