"""Rank discovery for every launcher, and real 2-rank start-ups (torchrun, mpirun, srun-style)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, run_ranks
from safeneurons.runtime import distributed
from safeneurons.runtime.launch import LaunchInfo, discover_launch, expand_slurm_nodelist


def test_single_process_has_rank_zero_and_no_process_group():
    context = distributed.init_distributed()
    assert (context.rank, context.world_size, context.backend, context.launcher) == (0, 1, None, "single")
    assert distributed.gather_to_main({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_from_main(5) == 5
    assert distributed.merge_dicts_to_main({3: "x"}) == {3: "x"}


def test_torchrun_variables_win_over_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert discover_launch(env) == LaunchInfo("torchrun", 3, 8, 1, "n1", 1234)


def test_openmpi_variables():
    env = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "6", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    info = discover_launch(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.master_addr) == ("mpirun", 5, 6, 1, None)


def test_mpich_variables():
    info = discover_launch({"PMI_RANK": "1", "PMI_SIZE": "4", "MASTER_ADDR": "h0"})
    assert (info.launcher, info.rank, info.world_size, info.master_addr) == ("mpirun", 1, 4, "h0")


def test_slurm_variables_take_master_from_first_node():
    env = {"SLURM_PROCID": "7", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu[07-08,11],login2", "PATH": ""}
    info = discover_launch(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("srun", 7, 16, 3)
    assert info.master_addr == "gpu07"
    assert info.master_port == 10000 + 4242


def test_slurm_single_task_is_single_process():
    assert discover_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).launcher == "single"


def test_nodelist_expansion():
    assert expand_slurm_nodelist("a[1-3],b,c[09-10]") == ["a1", "a2", "a3", "b", "c09", "c10"]


def test_bad_rank_variable_is_a_clear_error():
    from safeneurons.errors import SafeneuronsError

    with pytest.raises(SafeneuronsError, match="RANK='x'"):
        discover_launch({"RANK": "x", "WORLD_SIZE": "2"})


def test_round_robin_assignment_covers_every_layer_once():
    world = 3
    shares = [distributed.assign_round_robin(10, rank, world) for rank in range(world)]
    assert sorted(index for share in shares for index in share) == list(range(10))
    assert shares[1] == [1, 4, 7]
    assert all(distributed.owner_of(index, world) == rank for rank, share in enumerate(shares) for index in share)


def _launch_table(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr[-3000:]
    return sorted(line for line in result.stdout.splitlines() if line.startswith("rank="))


@pytest.mark.distributed
def test_torchrun_two_ranks_gather_to_rank_zero(tmp_path):
    result = run_ranks(["safeneurons.cli", "info", "--out", str(tmp_path)], timeout=120)
    lines = _launch_table(result)
    assert len(lines) == 2 and all("world_size=2" in line and "backend=gloo" in line for line in lines)
    reports = json.loads((tmp_path / "launch_info.json").read_text())
    assert [report["rank"] for report in reports] == [0, 1]


@pytest.mark.distributed
def test_mpirun_two_ranks_find_each_other_through_mpi():
    result = run_ranks(["safeneurons.cli", "info"], launcher="mpirun", timeout=120)
    lines = _launch_table(result)
    assert [line.split()[0] for line in lines] == ["rank=0", "rank=1"]
    assert all("launcher=mpirun" in line and "world_size=2" in line for line in lines)


@pytest.mark.distributed
def test_srun_style_variables_start_two_ranks():
    port = str(distributed.free_port())
    procs = []
    for proc_id in range(2):
        env = {**os.environ, "SLURM_PROCID": str(proc_id), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(proc_id),
               "SLURM_JOB_NODELIST": "localhost", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "OMP_NUM_THREADS": "1", "SAFENEURONS_TIMEOUT": "60"}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(key, None)
        procs.append(subprocess.Popen([sys.executable, "-m", "safeneurons.cli", "info"], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    lines = sorted(line for line in outputs[0][0].splitlines() if line.startswith("rank="))
    assert len(lines) == 2 and all("launcher=srun" in line for line in lines)
    assert outputs[1][0].strip() == ""  # only rank 0 prints


@pytest.mark.distributed
@pytest.mark.parametrize("launcher_args", [
    ["accelerate", "launch", "--use_deepspeed", "--zero_stage", "3", "--num_processes", "2", "--num_machines", "1",
     "--mixed_precision", "no", "--dynamo_backend", "no", "-m"],
    ["deepspeed", "--num_accelerators", "2", "--master_port", "{port}", "--module"],
], ids=["accelerate-deepspeed", "deepspeed"])
def test_accelerate_and_deepspeed_launchers(launcher_args):
    """Both launchers reach the same 2-rank gloo group (accelerate on CPU would report process_index 0 twice)."""
    args = [arg.replace("{port}", str(distributed.free_port())) for arg in launcher_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAFENEURONS_TIMEOUT": "60"}
    result = subprocess.run([*args, "safeneurons.cli", "info"], capture_output=True, text=True, timeout=180,
                            cwd=REPO, env=env)
    lines = _launch_table(result)
    assert [line.split()[0] for line in lines] == ["rank=0", "rank=1"]
    assert all("world_size=2" in line for line in lines)
