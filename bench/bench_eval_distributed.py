"""Evaluation at scale, side by side: generation for the AdvBench prompts on 1 rank, 2 ranks each holding the
model, and 2 ranks under ZeRO-3 (partitioned, lock-step), then the demo judge's throughput.

    python bench/bench_eval_distributed.py --advbench ../shared/data/advbench.txt          # 520 prompts
    python bench/bench_eval_distributed.py --advbench ../shared/data/advbench.txt --prompts 64 --max-new-tokens 64

Every run generates greedily with the same prompts, batch size and token budget on the demo model, times the
generation loop only (the model is loaded before the clock starts) and checks that the generations are the same
in every configuration. Prints seconds, prompts per second, the ratios against 1 rank, seconds per 1k prompts and
the judge's verdicts per second.
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

REPO = Path(__file__).resolve().parents[1]


def run_generation(args: argparse.Namespace) -> None:
    """One configuration (this process is one of its ranks): time generate_distributed, write the texts."""
    from safeneurons.data.samples import load_prompts
    from safeneurons.evaluation.generation import Decoding, generate_distributed
    from safeneurons.models.loading import load_for_inference
    from safeneurons.runtime import distributed

    context = distributed.init_distributed(require_process_group=args.zero3)
    config = str(REPO / "ds_configs" / "zero3_inference.json") if args.zero3 else None
    loaded = load_for_inference("demo", "float32", config, None, context.device)
    prompts = load_prompts(args.advbench, loaded.tokenizer, args.prompts)
    distributed.barrier()
    started = time.perf_counter()
    texts = generate_distributed(loaded.model, loaded.tokenizer, prompts, Decoding(args.max_new_tokens),
                                 args.batch_size)
    seconds = time.perf_counter() - started
    if distributed.is_main():
        Path(args.result).write_text(json.dumps({"seconds": seconds, "texts": texts}))
    distributed.shutdown()


def launch(args: argparse.Namespace, ranks: int, zero3: bool, result: Path) -> dict:
    common = [str(Path(__file__).resolve()), "--advbench", args.advbench, "--prompts", str(args.prompts),
              "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size),
              "--result", str(result), *(["--zero3"] if zero3 else [])]
    command = [sys.executable, *common] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *common]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks))}
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(result.read_text())


def judge_throughput(generations: list, advbench: str, prompts: int) -> tuple[float, int]:
    from safeneurons.data.readers import load_examples
    from safeneurons.evaluation.judges import judge_generations
    from safeneurons.models.loading import load_for_inference

    loaded = load_for_inference("demo-judge")
    behaviors = [example.prompt for example in load_examples(advbench)[:prompts]]
    started = time.perf_counter()
    verdicts = judge_generations("harmbench", behaviors, generations, loaded.model, loaded.tokenizer, 16)
    return time.perf_counter() - started, sum(verdict[0].harmful is None for verdict in verdicts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--advbench", default=str(REPO.parent / "shared" / "data" / "advbench.txt"))
    parser.add_argument("--prompts", type=int, default=520)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--zero3", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.result:
        run_generation(args)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        runs = {label: launch(args, ranks, zero3, Path(scratch) / f"{index}.json")
                for index, (label, ranks, zero3) in enumerate((("1 rank", 1, False), ("2 ranks", 2, False),
                                                                ("2 ranks, ZeRO-3", 2, True)))}
    base = runs["1 rank"]
    n = len(base["texts"])
    print(f"demo model, {n} AdvBench prompts, greedy, up to {args.max_new_tokens} new tokens, batch "
          f"{args.batch_size}; generation loop only")
    print(f"{'run':>16} {'seconds':>8} {'prompts/s':>9} {'vs 1 rank':>9} {'s per 1k':>8} {'same texts':>10}")
    for label, run in runs.items():
        print(f"{label:>16} {run['seconds']:>8.1f} {n / run['seconds']:>9.2f} {base['seconds'] / run['seconds']:>9.2f} "
              f"{1000 * run['seconds'] / n:>8.1f} {str(run['texts'] == base['texts']):>10}")
    seconds, unparsed = judge_throughput(base["texts"], args.advbench, args.prompts)
    print(f"demo judge (harmbench format, 1 rank): {n / seconds:.1f} verdicts/s, {1000 * seconds / n:.1f} s per 1k "
          f"prompts, {unparsed} unparsed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
