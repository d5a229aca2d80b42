"""Cluster launch: DeepSpeed configs, the launcher script, the SLURM scripts, a 2-node run on loopback, faults."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safeneurons.masks.io import load_masks
from safeneurons.runtime.distributed import free_port
from safeneurons.runtime.dsconfig import fill_config

REPO = Path(__file__).resolve().parents[2]
SHELL_SCRIPTS = sorted([*REPO.glob("launch/*.sh"), *REPO.glob("slurm/*.sh"), *REPO.glob("slurm/*.sbatch")])
# name -> (ZeRO stage, optimizer offload device, parameter offload device, trains)
CONFIGS = {
    "zero2": (2, None, None, True),
    "zero3": (3, None, None, True),
    "zero3_offload_optimizer": (3, "cpu", None, True),
    "zero3_offload_param": (3, "cpu", "cpu", True),
    "zero3_inference": (3, None, None, False),
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "SAFENEURONS_TIMEOUT": "120"}

# A fake srun: one task per "node" on this machine (SLURM_NODEID 0..SLURM_NNODES-1), and, like
# --kill-on-bad-exit, the first task that fails stops the others.
FAKE_SRUN = """#!/usr/bin/env bash
while [[ "${1:-}" == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" &
    pids+=($!)
done
status=0
for _ in "${pids[@]}"; do
    wait -n || { status=$?; kill "${pids[@]}" 2>/dev/null; }
done
exit $status
"""

# A fake interpreter for the array script: records the safeneurons arguments it gets and writes a summary
# into --out; it fails for the model named `broken` after writing a partial file.
FAKE_PYTHON = """#!/usr/bin/env bash
shift 2  # -m safeneurons.cli
out=""; model=""; args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    [[ "${args[i]}" == --out ]] && out="${args[i+1]}"
    [[ "${args[i]}" == --model ]] && model="${args[i+1]}"
done
echo "$*" >> "$FAKE_LOG"
mkdir -p "$out"
echo '{"selected": 7}' > "$out/partial.json"
[[ "$model" == broken ]] && exit 3
echo '{"total_selected": 42, "per_layer": {"0": 1}}' > "$out/score_summary.json"
"""


def test_every_shell_script_parses() -> None:
    names = {path.name for path in SHELL_SCRIPTS}
    assert {"run.sh", "array.sh", "multinode.sbatch"} <= names
    for script in SHELL_SCRIPTS:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"


def test_every_shipped_config_is_covered() -> None:
    assert {path.stem for path in (REPO / "ds_configs").glob("*.json")} == set(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_auto_values_come_from_the_arguments_and_deepspeed_accepts_it(name: str) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    stage, optimizer_device, param_device, trains = CONFIGS[name]
    filled = fill_config(REPO / "ds_configs" / f"{name}.json", micro_batch_size=2, gradient_accumulation_steps=3,
                         world_size=1, learning_rate=3e-5, weight_decay=0.1, gradient_clipping=0.5,
                         dtype=torch.bfloat16, hidden_size=64)
    parsed = DeepSpeedConfig(filled)
    assert parsed.zero_config.stage == stage
    assert parsed.bfloat16_config.enabled
    offload_optimizer, offload_param = parsed.zero_config.offload_optimizer, parsed.zero_config.offload_param
    assert (offload_optimizer.device if offload_optimizer else None) == optimizer_device
    assert (offload_param.device if offload_param else None) == param_device
    if trains:
        assert parsed.train_micro_batch_size_per_gpu == 2 and parsed.gradient_accumulation_steps == 3
        assert parsed.train_batch_size == 6 and parsed.gradient_clipping == 0.5
        assert filled["optimizer"]["params"]["lr"] == 3e-5 and filled["optimizer"]["params"]["weight_decay"] == 0.1
        assert parsed.zero_config.reduce_bucket_size == 64 * 64
    if stage == 3:
        assert parsed.zero_config.param_persistence_threshold == 10 * 64
    assert fill_config(filled) == filled  # nothing is left to fill


ENGINE_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from safeneurons import distributed
    from safeneurons.dsconfig import fill_config, zero_stage

    LR, WD, CLIP, STEPS = 1e-2, 0.1, 1.0, 3
    distributed.init_distributed(require_process_group=True)
    shape = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=32)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))

    def fresh_model():
        torch.manual_seed(0)
        return LlamaForCausalLM(shape)

    # reference: the same steps with torch's AdamW and gradient clipping, no DeepSpeed
    model = fresh_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, eps=1e-8)
    for _ in range(STEPS):
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad()
    results = {"reference": model(input_ids=ids, labels=ids).loss.item()}
    for path in sys.argv[1:]:
        config = fill_config(path, micro_batch_size=2, world_size=1, learning_rate=LR, weight_decay=WD,
                             gradient_clipping=CLIP, dtype=torch.float32, hidden_size=32)
        training = "optimizer" in config
        if config["zero_optimization"].get("offload_optimizer"):
            config["optimizer"]["params"]["torch_adam"] = True  # DeepSpeedCPUAdam needs a C++ build
        keep = HfDeepSpeedConfig(config) if zero_stage(config) == 3 else None
        model = fresh_model()
        engine, *_ = deepspeed.initialize(model=model, config=config,
                                          model_parameters=model.parameters() if training else None)
        first = engine(input_ids=ids, labels=ids).loss.item()
        for _ in range(STEPS if training else 0):
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
        results[path] = {"stage": engine.zero_optimization_stage(), "first": first,
                         "last": engine(input_ids=ids, labels=ids).loss.item()}
        del keep
    print("RESULTS " + json.dumps(results))
""")


@pytest.mark.slow
def test_every_config_initializes_deepspeed_and_trains_like_torch_adamw(tmp_path: Path) -> None:
    """Each filled config starts a real engine; training configs take the same steps as torch's AdamW."""
    paths = [str(REPO / "ds_configs" / f"{name}.json") for name in sorted(CONFIGS)]
    script = tmp_path / "engines.py"
    script.write_text(ENGINE_SCRIPT)
    result = subprocess.run([sys.executable, str(script), *paths], capture_output=True, text=True, env=ENV,
                            cwd=REPO, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.split("RESULTS ", 1)[1])
    reference = results.pop("reference")
    firsts = {entry["first"] for entry in results.values()}
    assert len(firsts) == 1  # the same initial model under every config
    for path, entry in results.items():
        stage, _, _, trains = CONFIGS[Path(path).stem]
        assert entry["stage"] == stage
        if trains:  # fp32 throughout: only the order of floating-point sums differs from the reference
            assert entry["last"] == pytest.approx(reference, abs=1e-4) and entry["last"] < entry["first"]
        else:
            assert entry["last"] == entry["first"]


def _run_script(command: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env={**ENV, **env}, cwd=REPO, timeout=timeout)


@pytest.mark.parametrize("launcher, expected", [
    ("torchrun", "-m torch.distributed.run --nnodes 2 --node-rank 1 --nproc-per-node 4 --master-addr node01 "
                 "--master-port 6000 -m safeneurons.cli score --model demo --out r"),
    ("deepspeed", "-m deepspeed.launcher.runner --master_addr node01 --master_port 6000 --hostfile hosts --no_ssh "
                  "--node_rank 1 --num_nodes 2 --num_gpus 4 --module safeneurons.cli score --model demo --out r"),
    ("accelerate", "--num_machines 2 --machine_rank 1 --num_processes 8 --main_process_ip node01 "
                   "--main_process_port 6000 -m safeneurons.cli score --model demo --out r"),
    ("mpirun", "mpirun -np 8 -x MASTER_PORT -x PATH -x MASTER_ADDR --map-by ppr:4:node --hostfile hosts"),
    ("none", "-m safeneurons.cli score --model demo --out r"),
])
def test_launcher_builds_each_launchers_command_with_the_same_arguments(launcher: str, expected: str) -> None:
    result = _run_script(["bash", "launch/run.sh", launcher, "score", "--model", "demo", "--out", "r"],
                         {"SAFENEURONS_DRY_RUN": "1", "NNODES": "2", "NODE_RANK": "1", "NPROC_PER_NODE": "4",
                          "MASTER_ADDR": "node01", "MASTER_PORT": "6000", "HOSTFILE": "hosts"})
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout
    assert result.stdout.rstrip().endswith("score --model demo --out r")


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    path = tmp_path / "fake-python"
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    return path


def test_array_runs_its_row_skips_finished_rows_and_marks_only_complete_ones(tmp_path: Path, fake_python: Path) -> None:
    grid = tmp_path / "grid.csv"
    grid.write_text("model,method,sparsity,seed\n# a comment\nllama2-7b-chat-hf,wandg,0.01,0\n\n"
                    "meta-llama/Llama-2-13b-chat-hf,wanda,0.05,1\nbroken random 0.1 2\n")
    log, results = tmp_path / "calls.log", tmp_path / "results"
    env = {"PYTHON": str(fake_python), "FAKE_LOG": str(log), "RESULTS": str(results), "LAUNCHER": "none",
           "EXTRA_ARGS": "--data align --nsamples 4"}

    def task(task_id: int) -> subprocess.CompletedProcess:
        return _run_script(["bash", "slurm/array.sh", str(grid)], {**env, "SLURM_ARRAY_TASK_ID": str(task_id)})

    assert _run_script(["bash", "slurm/array.sh", "--count", str(grid)], env).stdout.strip() == "3"
    dry = _run_script(["bash", "slurm/array.sh", str(grid)], {**env, "SLURM_ARRAY_TASK_ID": "1",
                                                              "SAFENEURONS_DRY_RUN": "1"})
    assert "-m safeneurons.cli score --model llama2-7b-chat-hf --score-method wandg --sparsity-ratio 0.01" in dry.stdout
    assert not results.exists() and not log.exists()  # printed only
    assert task(2).returncode == 0
    row = results / "meta-llama_Llama-2-13b-chat-hf__wanda__s0.05__seed1"
    assert log.read_text().splitlines() == [
        "score --model meta-llama/Llama-2-13b-chat-hf --score-method wanda --sparsity-ratio 0.05 --seed 1 "
        f"--out {row} --data align --nsamples 4"]
    assert (row / "DONE").is_file()
    assert json.loads((row / "row.json").read_text())["model"] == "meta-llama/Llama-2-13b-chat-hf"

    again = task(2)  # finished: skipped without running anything
    assert again.returncode == 0 and "already done" in again.stderr
    assert len(log.read_text().splitlines()) == 1

    failed = task(3)  # the command fails: the row's folder must not look complete
    assert failed.returncode == 3
    assert not (results / "broken__random__s0.1__seed2" / "DONE").exists()
    assert task(4).returncode == 2  # no such row
    assert task(1).returncode == 0

    collected = _run_script([sys.executable, "slurm/collect.py", str(results)], {})
    assert collected.returncode == 0, collected.stderr
    assert "not finished: broken__random__s0.1__seed2" in collected.stdout
    table = json.loads((results / "summary.json").read_text())
    assert [(entry["task"], entry["model"], entry["score_summary.total_selected"]) for entry in table] == [
        (1, "llama2-7b-chat-hf", 42), (2, "meta-llama/Llama-2-13b-chat-hf", 42)]
    assert "score_summary.per_layer" not in table[0]  # nested values stay in the rows' own files
    csv_lines = (results / "summary.csv").read_text().splitlines()
    assert csv_lines[0].startswith("task,model,method,sparsity,seed,stage") and len(csv_lines) == 3


# --- several nodes on this machine -------------------------------------------------------------------------

@pytest.fixture
def slurm_env(tmp_path: Path) -> dict[str, str]:
    """What SLURM gives a 2-node job, with srun faked and the node list on loopback (127.0.0.1, 127.0.0.2)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "127.0.0.[1-2]", "SLURM_SUBMIT_DIR": str(REPO), "NPROC_PER_NODE": "1",
            "MASTER_PORT": str(free_port())}


def _sbatch(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return _run_script(["bash", "slurm/multinode.sbatch", *args], env, timeout=400)


def _single_node(args: list[str]) -> subprocess.CompletedProcess:
    return _run_script(["bash", "launch/run.sh", "torchrun", *args],
                       {"NNODES": "1", "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())}, timeout=400)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_nodes_through_the_sbatch_script_match_one_node(tmp_path: Path, slurm_env: dict[str, str]) -> None:
    """sbatch's path (srun -> launch/run.sh -> torchrun --nnodes 2 --node-rank i) scores and fine-tunes under
    ZeRO-3 exactly as one node with the same number of ranks does."""
    def score(out: Path) -> list[str]:
        return ["score", "--model", "demo", "--method", "wandg", "--data", "demo-align", "--nsamples", "4",
                "--max-length", "48", "--sparsity-ratio", "0.05", "--deepspeed", "ds_configs/zero3_inference.json",
                "--out", str(out)]

    def finetune(masks: Path, out: Path) -> list[str]:
        return ["finetune", "--model", "demo", "--masks", str(masks), "--data", "demo-utility", "--nsamples", "8",
                "--num-epochs", "1", "--max-steps", "2", "--batch-size", "2", "--max-length", "48",
                "--learning-rate", "1e-3", "--weight-decay", "0.1", "--deepspeed", "ds_configs/zero3.json",
                "--save-path", str(out)]

    two, one = tmp_path / "two-nodes", tmp_path / "one-node"
    for result in (_sbatch(score(two / "score"), slurm_env), _single_node(score(one / "score"))):
        assert result.returncode == 0, result.stderr[-4000:]
    masks_two, masks_one = load_masks(two / "score"), load_masks(one / "score")
    assert masks_two.keys() == masks_one.keys() and len(masks_two) == 42
    assert all(torch.equal(masks_two[name], masks_one[name]) for name in masks_two)

    sbatch_run = _sbatch(finetune(two / "score", two / "ft"), slurm_env)
    assert sbatch_run.returncode == 0, sbatch_run.stderr[-4000:]
    assert "--nnodes 2 --node-rank 0" in sbatch_run.stderr and "--nnodes 2 --node-rank 1" in sbatch_run.stderr
    single_run = _single_node(finetune(one / "score", one / "ft"))
    assert single_run.returncode == 0, single_run.stderr[-4000:]

    from safeneurons.models.loading import demo_model_dir

    original = load_file(demo_model_dir() / "model.safetensors")
    tuned_two, tuned_one = load_file(two / "ft" / "model.safetensors"), load_file(one / "ft" / "model.safetensors")
    changed = 0
    for name, mask in masks_two.items():
        assert torch.equal(tuned_two[name][mask], original[name][mask])  # frozen: bit for bit
        assert torch.equal(tuned_one[name][mask], original[name][mask])
        changed += int((tuned_two[name][~mask] != original[name][~mask]).sum())
    assert changed > 0
    # Same world size, same partitioning, same data split: each gradient reduction sums the same two
    # partial gradients, and a + b == b + a exactly in IEEE arithmetic, so the free weights agree bit for bit.
    for name in original:
        assert torch.equal(tuned_two[name], tuned_one[name]), name
    report = json.loads((two / "ft" / "freeze_report.json").read_text())
    assert report["world_size"] == 2 and report["max_abs_change_frozen"] == 0.0


DYING_RANK = textwrap.dedent("""
    import os, pathlib, sys, time
    from safeneurons import distributed
    from safeneurons.outputs import publish_dir, staging_dir

    final = sys.argv[1]
    context = distributed.init_distributed()
    distributed.barrier()
    (staging_dir(final) / f"shard-{context.rank}").write_text("partial")
    if context.rank == 1:
        if os.environ["FAULT"] == "exit":
            os._exit(7)  # dies without a word while rank 0 waits in the collective below
        pathlib.Path(final + ".stuck-pid").write_text(str(os.getpid()))
        time.sleep(300)  # hangs: only the collective timeout can end rank 0
    distributed.all_ranks_ok(True)
    distributed.barrier()
    if context.rank == 0:
        publish_dir(final)
""")


def _start_node(node_rank: int, port: int, script: Path, final: Path, fault: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node_rank),
               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port), str(script),
               str(final)]
    return subprocess.Popen(command, env={**ENV, "SAFENEURONS_TIMEOUT": "15", "FAULT": fault}, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


@pytest.mark.distributed
@pytest.mark.parametrize("fault", ["exit", "hang"])
def test_a_dead_or_stuck_rank_ends_the_job_and_leaves_no_complete_result(tmp_path: Path, fault: str) -> None:
    """Two launcher processes (--nnodes 2, one rank each); rank 1 dies or hangs before a collective. Rank 0's
    launcher must exit non-zero on its own (the collective fails, or gives up after SAFENEURONS_TIMEOUT=15 s)
    long before the 120 s wait ends, and the result folder must not exist. A dead rank also ends its own
    launcher; a stuck one is left to the scheduler (srun --kill-on-bad-exit in slurm/multinode.sbatch)."""
    script = tmp_path / "dying_rank.py"
    script.write_text(DYING_RANK)
    final, port = tmp_path / "result", free_port()
    nodes = [_start_node(node_rank, port, script, final, fault) for node_rank in (0, 1)]
    try:
        assert nodes[0].wait(timeout=120) != 0
        if fault == "exit":
            assert nodes[1].wait(timeout=120) != 0
        assert not final.exists()
    finally:
        stuck = final.with_name(final.name + ".stuck-pid")
        if stuck.exists():  # torchrun starts its workers in their own session: end the stuck one directly
            os.kill(int(stuck.read_text()), signal.SIGKILL)
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
            node.wait()
