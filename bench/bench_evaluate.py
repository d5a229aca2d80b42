"""Evaluation throughput: batched left-padded greedy generation vs one prompt at a time (the naive loop), and
batched perplexity vs one text at a time, on the demo model. Prints both timings and the speed-up ratios; the
sides take turns, best of --repeats rounds each (bench/timing.py)."""
from __future__ import annotations

import argparse

import torch

from safeneurons.data.readers import load_examples
from safeneurons.data.samples import load_prompts, select
from safeneurons.evaluation.generation import Decoding, generate
from safeneurons.evaluation.perplexity import perplexity, text_samples
from safeneurons.models.loading import load_model_and_tokenizer
from timing import interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--texts", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer("demo")
    prompts = load_prompts("demo-harmful", tokenizer, args.prompts // 2) + load_prompts(
        "demo-harmless", tokenizer, args.prompts // 2)
    generation = interleaved({size: lambda size=size: generate(model, tokenizer, prompts, Decoding(args.max_new_tokens),
                                                               size) for size in (32, 1)}, args.repeats)
    (batched, batched_s), (naive, naive_s) = ((generation[size].value, generation[size].wall) for size in (32, 1))
    print(f"generation, {len(prompts)} prompts x {args.max_new_tokens} tokens: batched {batched_s:.2f} s, "
          f"one at a time {naive_s:.2f} s, ratio {naive_s / batched_s:.1f}x; same texts: {batched == naive}")
    samples = text_samples(select(load_examples("demo-utility"), args.texts, 0), tokenizer, 128)
    scored = interleaved({size: lambda size=size: perplexity(model, tokenizer, samples, size) for size in (32, 1)},
                         args.repeats)
    (fast, fast_s), (slow, slow_s) = ((scored[size].value, scored[size].wall) for size in (32, 1))
    print(f"perplexity, {len(samples)} texts: batched {fast_s:.2f} s, one at a time {slow_s:.2f} s, ratio "
          f"{slow_s / fast_s:.1f}x; values {fast:.6f} vs {slow:.6f}")


if __name__ == "__main__":
    main()
