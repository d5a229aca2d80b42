"""Scoring time of wandg: the default schedule (one backward per sample for all layers) against the original
sequential schedule (one backward per layer per sample, earlier layers pruned) — ours and the original code's
recipe (only the scored layer's weights require grad, `param.grad` per sample) — against a plain training step
over the same tokens, and exact sums (the default) against running float32 sums. Same model, same samples,
measured side by side in one run: the sides take turns, best of --repeats rounds each (bench/timing.py).

    python bench/bench_scoring.py [--model demo] [--nsamples 32] [--max-length 128] [--batch-size 8] [--threads 1] [--repeats 3]
"""
from __future__ import annotations

import argparse
import copy
import logging

import torch

from safeneurons.data.samples import load_samples, pad_batch
from safeneurons.models.loading import load_model, load_tokenizer
from safeneurons.models.structure import decoder_layers
from safeneurons.scores.config import ScoreConfig
from safeneurons.scores.schedules import score_model
from timing import interleaved


def training_step(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
    """One AdamW step: forward and backward (parameter gradients) of every batch, accumulated, then the update."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for batch in batches:
        model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def original_sequential(model: torch.nn.Module, samples: list, ratio: float) -> dict[str, torch.Tensor]:
    """The original repository's wandg schedule (lib/model_wrapper.py, prune_wandg): for each layer only its
    Linears require grad, one forward and backward of HF's loss per sample, Σ |weight.grad|, the top per row of
    |W| · Σ|grad| zeroed before the next layer. Returns the masks."""
    model = copy.deepcopy(model)
    model.requires_grad_(False)
    masks = {}
    for index, layer in enumerate(decoder_layers(model)):
        linears = {f"model.layers.{index}.{name}.weight": module for name, module in layer.named_modules()
                   if isinstance(module, torch.nn.Linear)}
        for module in linears.values():
            module.weight.requires_grad_(True)
        saved = {name: torch.zeros_like(module.weight) for name, module in linears.items()}
        for sample in samples:
            model.zero_grad()
            model(input_ids=sample.input_ids[None], labels=sample.labels[None]).loss.backward()
            for name, module in linears.items():
                saved[name] += module.weight.grad.abs()
        with torch.no_grad():
            for name, module in linears.items():
                score = module.weight.abs() * saved[name]
                keep = torch.sort(-score, dim=-1, stable=True)[1][:, :int(score.shape[1] * ratio)]
                masks[name] = torch.zeros_like(score, dtype=torch.bool).scatter_(1, keep, True)
                module.weight[masks[name]] = 0
                module.weight.requires_grad_(False)
    return masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--data", default="demo-align")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="micro-batch of the batched default run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    args = parser.parse_args()
    logging.getLogger("safeneurons").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    config = ScoreConfig(method="wandg", data=args.data, sparsity_ratio=0.05, nsamples=args.nsamples,
                         max_length=args.max_length)
    samples = load_samples(args.data, tokenizer, args.nsamples, config.seed, args.max_length)
    batch = pad_batch(samples, tokenizer.pad_token_id)
    tokens = int(batch["attention_mask"].sum())
    layers = len(decoder_layers(model))

    interleaved({"warm-up": lambda: score_model(model, tokenizer, ScoreConfig(**{**vars(config), "nsamples": 2}))}, 1)
    trainee = copy.deepcopy(model)
    single_batches = [pad_batch([sample], tokenizer.pad_token_id) for sample in samples]
    sequential_config = ScoreConfig(**{**vars(config), "sequential": True})
    sides = {
        "wandg default (1 backward per sample)": lambda: score_model(model, tokenizer, config),
        "wandg default, running float32 sums": lambda: score_model(
            model, tokenizer, ScoreConfig(**{**vars(config), "accumulate_dtype": "float32"})),
        f"wandg default, micro-batches of {args.batch_size}": lambda: score_model(
            model, tokenizer, ScoreConfig(**{**vars(config), "batch_size": args.batch_size})),
        "wandg sequential (1 backward per layer per sample)": lambda: score_model(model, tokenizer, sequential_config),
        "original code's sequential recipe (same passes)": lambda: original_sequential(model, samples,
                                                                                        config.sparsity_ratio),
        "plain training step (same tokens, one batch)": lambda: training_step(trainee, [batch]),
        "training step, 1 sample per pass (same passes as default)": lambda: training_step(trainee, single_batches),
    }
    timings = interleaved(sides, args.repeats)
    ours = timings["wandg sequential (1 backward per layer per sample)"].value.masks
    original = timings["original code's sequential recipe (same passes)"].value
    same = sum(int((ours[name] == mask).sum()) for name, mask in original.items()) / sum(
        mask.numel() for mask in original.values())

    print(f"\nmodel {args.model}: {layers} layers, {len(samples)} samples, {tokens} tokens, "
          f"{torch.get_num_threads()} threads, best of {args.repeats} interleaved rounds")
    print(f"{'':58s} {'wall s':>8s} {'cpu s':>8s}")
    for label, timing in timings.items():
        print(f"{label:58s} {timing.wall:8.2f} {timing.cpu:8.2f}")
    print(f"sequential: {layers} x {len(samples)} forward+backward passes in both schedules (ours starts each at the "
          f"scored layer, from cached hidden states); masks equal to the original's at {same:.4%} of the weights "
          f"(it sums in fp32 in sample order, ours exactly)")
    labels = list(sides)
    for label, numerator, denominator in (("exact / float32 sums (cost of exact sums)", labels[0], labels[1]),
                                          ("sequential / default", labels[3], labels[0]),
                                          ("original sequential / ours (speed of ours)", labels[4], labels[3]),
                                          ("default / training step", labels[0], labels[5]),
                                          ("batched default / training step", labels[2], labels[5]),
                                          ("default / training step of 1-sample passes", labels[0], labels[6])):
        print(f"{label:58s} {timings[numerator].wall / timings[denominator].wall:7.2f}x "
              f"{timings[numerator].cpu / timings[denominator].cpu:7.2f}x")


if __name__ == "__main__":
    main()
