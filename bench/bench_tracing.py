"""Lineage tracing (`safeneurons trace`), measured side by side in one run and reported as ratios.

    python bench/bench_tracing.py          # default: about 3 minutes on 2 idle CPU cores
    python bench/bench_tracing.py --full   # adds the independent pair at width 11008 (minutes per solver)

1. Assignment solvers per layer at realistic MLP widths: scipy's `linear_sum_assignment` against `lap.lapjv` on the
   same cost matrix (float64 squared distances between neurons' activation vectors), for a dependent pair (the
   other model's neurons are a noisy permutation of the base's, as after fine-tuning) and an independent pair;
   time of the distance matrix alongside. Both solvers must return the same assignment.
2. Distance precision: bf16 distances (the original code) against ours (float64) on near-identical neurons:
   share of neurons matched to their true partner.
3. Activation collection on the demo model: ours (one pass per model for every layer's gate and up outputs)
   against the original's four passes per layer (gate and up, each model separately).
4. Whole-model speed-up of `safeneurons trace` with 2 ranks (1 thread each) against 1 rank (2 threads) on two
   independently initialised random Llama models (the assignments dominate), end to end, the same p-values.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from timing import interleaved
from safeneurons.interp import tracing

REPO = Path(__file__).resolve().parents[1]


def synthetic_pair(width: int, tokens: int, kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """[tokens, width] activations of a base layer and of a dependent (noisy permuted copy) or independent one."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((tokens, width), dtype=np.float32)
    if kind == "independent":
        return base, rng.standard_normal((tokens, width), dtype=np.float32)
    noise = 0.3 * rng.standard_normal((tokens, width), dtype=np.float32)
    return base, base[:, rng.permutation(width)] + noise


def bench_solvers(widths: list[int], kinds: list[str], tokens: int, skip: set[tuple[int, str]], repeats: int) -> None:
    print(f"\n1. assignment per layer ({tokens} tokens; seconds; ratio = scipy / lap)")
    print(f"{'width':>6} {'pair':>12} {'distances':>10} {'scipy':>8} {'lap':>8} {'ratio':>6}  same")
    for width in widths:
        for kind in kinds:
            if (width, kind) in skip:
                print(f"{width:>6} {kind:>12}  (skipped: run with --full)")
                continue
            base, other = synthetic_pair(width, tokens, kind, seed=width)
            x, y = torch.from_numpy(base).T.double(), torch.from_numpy(other).T.double()
            timings = interleaved({"distances": lambda: tracing.pairwise_sq_distances(x, y).numpy()}, 1)
            cost, distance_s = timings["distances"].value, timings["distances"].wall
            solved = interleaved({solver: lambda solver=solver: tracing.solve_assignment(cost, solver)
                                  for solver in ("scipy", "lap")}, repeats)
            scipy_s, lap_s = solved["scipy"].wall, solved["lap"].wall
            same = np.array_equal(solved["scipy"].value, solved["lap"].value)
            print(f"{width:>6} {kind:>12} {distance_s:>10.2f} {scipy_s:>8.2f} {lap_s:>8.2f} "
                  f"{scipy_s / lap_s:>6.2f}  {same}", flush=True)


def bench_precision(width: int = 512, dim: int = 1024) -> None:
    rng = np.random.default_rng(0)
    shared = 5.0 + rng.standard_normal((1, dim))
    base = torch.tensor(shared + 1e-2 * rng.standard_normal((width, dim)), dtype=torch.float32)
    perm = rng.permutation(width)
    other = base[perm] + 1e-3 * torch.tensor(rng.standard_normal((width, dim)), dtype=torch.float32)
    truth = np.argsort(perm)
    x, y = base.bfloat16(), other.bfloat16()
    bf16_cost = ((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T).double().numpy()
    bf16 = (tracing.solve_assignment(bf16_cost) == truth).mean()
    ours = (tracing.match_wmats(base, other) == truth).mean()
    print(f"\n2. near-identical neurons ({width}, common part 5 + N(0,1), spread 1e-2, noise 1e-3): "
          f"correctly matched bf16 (original) {bf16:.1%}, float64 (ours) {ours:.1%}")


def bench_collection(tokens: int, repeats: int) -> None:
    from safeneurons.models.loading import load_model, load_tokenizer

    model, tokenizer = load_model("demo"), load_tokenizer("demo")
    batches = tracing.pack_tokens(tracing.text_token_ids(tokenizer, ["demo-harmless", "demo-utility"], tokens, 0),
                                  128, 8)
    layers = len(model.model.layers)
    tracing.collect_mlp_activations(model, batches[:1])  # warm-up: the first forward pays one-off costs

    def original():  # mlp_matching_gate then mlp_matching_up per layer: each runs both models
        for layer in range(layers):
            for kind in tracing.KINDS:
                for m in (model, model):
                    tracing.collect_mlp_activations(m, batches, [layer], kinds=[kind])

    timings = interleaved({"ours": lambda: [tracing.collect_mlp_activations(m, batches) for m in (model, model)],
                           "original": original}, repeats)
    ours, theirs = timings["ours"].wall, timings["original"].wall
    print(f"\n3. activation collection, demo model ({layers} layers, {tokens} tokens): ours 2 passes {ours:.2f} s, "
          f"original {4 * layers} passes {theirs:.2f} s, ratio {theirs / ours:.1f}x")


def write_random_models(folder: Path, width: int, layers: int) -> tuple[Path, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from safeneurons.models.loading import load_tokenizer

    tokenizer = load_tokenizer("demo")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=width,
                         num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = folder / f"random-{seed}"
        LlamaForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def run_trace(base: Path, other: Path, out: Path, ranks: int, tokens: int) -> tuple[float, dict]:
    arguments = ["-m", "safeneurons.cli", "trace", "--base", str(base), "--other", str(other), "--n-tokens",
                 str(tokens), "--random-tokens", "--out", str(out)]
    if ranks > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                   *arguments]
    else:
        command = [sys.executable, *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // ranks), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if completed.returncode != 0:
        raise SystemExit(completed.stderr[-3000:])
    return time.perf_counter() - started, json.loads((out / "trace.json").read_text())


def bench_ranks(width: int, layers: int, tokens: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        base, other = write_random_models(Path(folder), width, layers)
        one_s, one = run_trace(base, other, Path(folder) / "one", 1, tokens)
        two_s, two = run_trace(base, other, Path(folder) / "two", 2, tokens)
    same = [layer["pvalue"] for layer in one["layers"]] == [layer["pvalue"] for layer in two["layers"]]
    print(f"\n4. whole model, {layers} layers x {width} neurons, {tokens} random tokens, end to end: 1 rank "
          f"{one_s:.1f} s, 2 ranks {two_s:.1f} s, speed-up {one_s / two_s:.2f}x; same p-values: {same}; "
          f"solving time summed over layers {sum(l['seconds'] for l in one['layers']):.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[4096, 11008])
    parser.add_argument("--kinds", nargs="+", default=["dependent", "independent"],
                        choices=["dependent", "independent"])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per neuron vector in part 1")
    parser.add_argument("--rank-width", type=int, default=2048, help="MLP width of the random models of part 4")
    parser.add_argument("--rank-layers", type=int, default=8)
    parser.add_argument("--full", action="store_true", help="also the independent pair at width 11008")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds in which the compared sides run in turn; each side's best (default %(default)s)")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    bench_solvers(args.widths, args.kinds, args.tokens, set() if args.full else {(11008, "independent")},
                  args.repeats)
    bench_precision()
    bench_collection(2048, args.repeats)
    bench_ranks(args.rank_width, args.rank_layers, 1024)


if __name__ == "__main__":
    main()
