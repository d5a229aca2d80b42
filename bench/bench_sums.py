"""What rank-independent sums cost: wandg with `--accumulate-dtype fixed` (the default: one int64 word a weight),
`exact` (two words) and `float32` (running sums, order-dependent), side by side in one run on smollm2-safe
(align_short) and on bench_distributed's ~100M Llama (demo-align), then plan's passes for llama2-70b.

    python bench/bench_sums.py [--rounds 2] [--models smollm2-safe,llama100m] [--align FILE]

Each run is the real `safeneurons score` in a fresh process, one thread per rank (bench_distributed's worker):
wandg's loop time per sample (the passes and the sums; loading and selection left out), the whole command's
time, the peak RSS of the largest rank, and on 2 data-parallel ranks the loop's speed-up and the bytes each rank
hands to the collectives. The sides take turns, round after round, and each keeps its fastest round. Then, in
this process and warm (the one-time compile left out, as on a long run), the loop per sample of `fixed` with its
compiled add and with the eager chunks against `float32`, taking turns in the same way.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench_distributed import build_models, launch
from timing import interleaved

REPO = Path(__file__).resolve().parents[1]
ALIGN = REPO.parent / "shared" / "data" / "SFT_aligned_llama2-7b-chat-hf_train_short.csv"
DTYPES = ("fixed", "exact", "float32")


def score_command(model: str, data: str, nsamples: int, length: int, accumulate: str) -> list[str]:
    return ["score", "--method", "wandg", "--model", model, "--data", data, "--nsamples", str(nsamples),
            "--max-length", str(length), "--sparsity-ratio", "0.01", "--accumulate-dtype", accumulate]


def best_runs(workloads: dict[str, tuple[list[str], int]], rounds: int, scratch: Path) -> dict[tuple, dict]:
    """Every (workload, ranks) run `rounds` times in turn; per run its fastest loop (and that round's figures)."""
    best: dict[tuple, dict] = {}
    for round_index in range(rounds):
        for label, (command, _) in workloads.items():
            for ranks in (1, 2):
                result = scratch / f"{label.replace(' ', '_')}-{ranks}-{round_index}.json"
                run = launch("wandg", command, ranks, False, result)
                if (label, ranks) not in best or run["loop"] < best[label, ranks]["loop"]:
                    best[label, ranks] = run
                print(f"  round {round_index + 1}: {label}, {ranks} rank(s): loop {run['loop']:.2f} s", flush=True)
    return best


def print_table(model: str, workloads: dict[str, tuple[list[str], int]], best: dict[tuple, dict]) -> None:
    print(f"\n{model}: wandg, best of the rounds")
    print(f"{'sums':>8} {'loop s/sample':>13} {'× float32':>9} {'command s':>9} {'peak RSS GB':>11} {'× float32':>9} "
          f"{'2-rank speed-up':>15} {'MB/rank reduced':>15}")
    base = next(label for label in workloads if label.endswith("float32"))
    for label, (_, samples) in workloads.items():
        one, two = best[label, 1], best[label, 2]
        print(f"{label.split()[-1]:>8} {one['loop'] / samples:>13.3f} {one['loop'] / best[base, 1]['loop']:>9.2f} "
              f"{one['seconds']:>9.1f} {one['peak'] / 1e9:>11.2f} {one['peak'] / best[base, 1]['peak']:>9.2f} "
              f"{one['loop'] / two['loop']:>15.2f} {two['bytes'] / 1e6:>15.1f}", flush=True)


def steady_loops(label: str, model_name: str, data: str, nsamples: int, length: int, rounds: int) -> None:
    """wandg's loop (collect_statistics) per sample in this process, one thread: fixed sums with the compiled add
    (compiled beforehand) and with the eager chunks, and float32, taking turns."""
    import torch

    from safeneurons.data.samples import load_samples
    from safeneurons.models.loading import load_model, load_tokenizer
    from safeneurons.models.structure import model_device
    from safeneurons.scores import accumulators
    from safeneurons.scores.config import ScoreConfig, targets_of
    from safeneurons.scores.statistics import collect_statistics

    torch.set_num_threads(1)
    model, tokenizer = load_model(model_name), load_tokenizer(model_name)
    config = ScoreConfig(method="wandg", data=data, nsamples=nsamples, max_length=length, sparsity_ratio=0.01)
    samples = load_samples(data, tokenizer, nsamples, config.seed, length)
    targets = targets_of(model)
    key = (accumulators._scaled_add, model_device(model).type)
    accumulators.COMPILE_WORTH = 10 ** 30  # nothing compiles in the background: the sides choose
    accumulators.compile_step(accumulators._scaled_add, model_device(model))
    compiled = accumulators._compiled[key]

    def loop(accumulate: str, add=None):
        accumulators._compiled[key] = add
        return collect_statistics(model, targets, samples, ScoreConfig(**{**vars(config),
                                                                           "accumulate_dtype": accumulate}))

    loop("fixed", compiled)  # the compiled add's other shapes, traced once
    timings = interleaved({"fixed, compiled add": lambda: loop("fixed", compiled),
                           "fixed, eager chunks": lambda: loop("fixed"), "float32": lambda: loop("float32")}, rounds)
    base = timings["float32"].wall
    print(f"\n{label}: wandg's loop in one warm process, best of {rounds} rounds")
    for label, timing in timings.items():
        print(f"{label:>20} {timing.wall / nsamples:>8.3f} s/sample {timing.wall / base:>6.2f}x float32", flush=True)


def plan_lines() -> None:
    from safeneurons.workflows.plan import Cluster, PlanConfig, Workload, format_table, run_plan

    print("\nplan llama2-70b on 1 × 8 × 80 GB, score --shard layers:")
    for accumulate in DTYPES:
        table = format_table(run_plan(PlanConfig("llama2-70b", Cluster(1, 8, 80.0),
                                                 Workload(accumulate_dtype=accumulate))))
        print(f"  {accumulate:>8}: " + next(line for line in table.splitlines()
                                             if line.startswith("score --shard layers")).split(": ", 1)[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--models", default="smollm2-safe,llama100m")
    parser.add_argument("--align", default=str(ALIGN), help="smollm2-safe's samples (align_short)")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=14)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        for model in args.models.split(","):
            if model == "smollm2-safe":
                shape = ("smollm2-safe", args.align, 8, 256)
            else:
                path, _ = build_models(Path(scratch), args)
                shape = (path, "demo-align", 32, 128)
            workloads = {f"{model} {accumulate}": (score_command(*shape, accumulate), shape[2])
                         for accumulate in DTYPES}
            print_table(model, workloads, best_runs(workloads, args.rounds, Path(scratch)))
            steady_loops(model, *shape, args.rounds)
    plan_lines()
    return 0


if __name__ == "__main__":
    sys.exit(main())
