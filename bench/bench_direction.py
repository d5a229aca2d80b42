"""The refusal direction's selection: ours (candidates batched into one forward pass, `--candidates-per-pass`, only
the last position's logits) against the original's loop (refusal_direction's select_direction: for each
candidate, hooks registered and three passes over the validation prompts — ablation on harmful, ablation on
harmless for the KL, addition on harmless — full logits, batches of 32). Same model, prompts and candidates; both
must select the same (position, layer) before the times count. The sides take turns (bench/timing.py).

    python bench/bench_direction.py [--model demo] [--n-val 32] [--repeats 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import math

import torch
from timing import interleaved

from safeneurons.data.samples import load_prompts
from safeneurons.interp.direction.candidates import compute_candidates, encode
from safeneurons.interp.direction.positions import post_instruction_tokens
from safeneurons.interp.direction.run import RefusalDirectionConfig, draw
from safeneurons.interp.direction.selection import SelectionConfig, score_candidates, select
from safeneurons.interp.patching.metrics import refusal_metric, refusal_token_ids
from safeneurons.models.loading import load_model_and_tokenizer

THRESHOLDS = dict(kl_threshold=1000.0, induce_threshold=-1000.0)  # the demo's candidates all fail the defaults


def original_loop(model, tokenizer, candidates, harmful, harmless, refusal_ids, batch_size=32):
    """select_direction's three loops over (position, layer), as the original code runs them."""
    def logits(prompts, pre=(), post=()):
        handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module, hook in pre]
        handles += [module.register_forward_hook(hook) for module, hook in post]
        found = []
        for start in range(0, len(prompts), batch_size):
            with torch.no_grad():
                found.append(model(**encode(tokenizer, prompts[start:start + batch_size], torch.device("cpu")))
                             .logits[:, -1].double())
        for handle in handles:
            handle.remove()
        return torch.cat(found)

    def score(last):
        probs = last.softmax(-1)[:, refusal_ids].sum(-1)
        return (torch.log(probs + 1e-8) - torch.log(1 - probs + 1e-8)).mean().item()

    def ablation_hooks(direction):
        unit = direction / (direction.norm() + 1e-8)

        def ablate(x):
            u = unit.to(x)
            return x - (x @ u).unsqueeze(-1) * u
        pre = [(block, lambda m, a, k: ((ablate(a[0]), *a[1:]), k) if a else (a, {**k, "hidden_states":
                                                                                ablate(k["hidden_states"])}))
               for block in model.model.layers]
        post = [(module, lambda m, i, o: (ablate(o[0]), *o[1:]) if isinstance(o, tuple) else ablate(o))
                for block in model.model.layers for module in (block.self_attn, block.mlp)]
        return pre, post

    n_pos, n_layer, _ = candidates.shape
    baseline = logits(harmless)
    best = None
    for pos in range(-n_pos, 0):
        for layer in range(n_layer):
            direction = candidates[pos, layer].float()
            pre, post = ablation_hooks(direction)
            bypass = score(logits(harmful, pre, post))
            ablated = logits(harmless, pre, post).softmax(-1)
            base = baseline.softmax(-1)
            kl = torch.sum(base * (torch.log(base + 1e-6) - torch.log(ablated + 1e-6)), -1).mean().item()
            add = [(model.model.layers[layer], lambda m, a, k, v=direction: ((a[0] + v.to(a[0]), *a[1:]), k) if a
                    else (a, {**k, "hidden_states": k["hidden_states"] + v.to(k["hidden_states"])}))]
            induce = score(logits(harmless, add))
            keep = not (math.isnan(bypass) or layer >= int(n_layer * 0.8) or kl > THRESHOLDS["kl_threshold"]
                        or induce < THRESHOLDS["induce_threshold"])
            if keep and (best is None or bypass < best[0]):
                best = (bypass, pos, layer)
    return best[1], best[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--n-val", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model)
    config = RefusalDirectionConfig(n_train=32, n_val=args.n_val)
    (harmful_train, harmful_val, _), (harmless_train, harmless_val, _) = (
        draw(load_prompts("demo-harmful", tokenizer), config, "harmful"),
        draw(load_prompts("demo-harmless", tokenizer), config, "harmless"))
    candidates = compute_candidates(model, tokenizer, harmful_train, harmless_train,
                                    post_instruction_tokens(tokenizer), batch_size=16)
    refusal_ids = refusal_token_ids(tokenizer)

    def ours(per_pass: int):
        settings = SelectionConfig(**THRESHOLDS, batch_size=16, candidates_per_pass=per_pass)
        scores = score_candidates(model, tokenizer, candidates, harmful_val, harmless_val,
                                  refusal_metric(refusal_ids), settings)
        best = select(scores, candidates.directions.shape[1], settings)
        return best.position, best.layer

    sides = {"original loop": lambda: original_loop(model, tokenizer, candidates.directions, harmful_val,
                                                    harmless_val, refusal_ids),
             "ours, 1 candidate a pass": lambda: ours(1), "ours, 8 candidates a pass": lambda: ours(8),
             "ours, 18 candidates a pass": lambda: ours(18)}
    timings = interleaved(sides, args.repeats)
    chosen = {label: timing.value for label, timing in timings.items()}
    assert len(set(chosen.values())) == 1, chosen
    reference = timings["original loop"].wall
    print(f"{args.model}: {candidates.directions.shape[0] * candidates.directions.shape[1]} candidates, "
          f"{len(harmful_val)} + {len(harmless_val)} validation prompts, {args.threads} threads, best of "
          f"{args.repeats}; every side selects {next(iter(chosen.values()))}")
    for label, timing in timings.items():
        print(f"  {label:28s} {timing.wall:7.2f} s wall  {timing.cpu:7.2f} s CPU  {reference / timing.wall:5.2f}x")


if __name__ == "__main__":
    main()
