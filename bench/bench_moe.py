"""Mixtures of experts: wandg's per-expert scores against the per-sample autograd reference, the cost of a sample
against a dense model of the same active size, and `plan`'s figures for three published MoE models.

1. wandg on the same samples, side by side (interleaved rounds, best of each): ours (one forward and backward per
   micro-batch; each expert's |dY^T X| from the tokens routed to it; exact sums, and float32 sums) against the
   reference every other tool would write — one `loss.backward()` per sample with parameter gradients (the model's
   own experts kernel), Σ |grad| of every scored parameter, the fused 3-D experts included. On demo-moe (Mixtral,
   4 experts, top-2, 6 layers) and on a larger random Mixtral (--hidden, --experts, --layers).
2. ours on demo-moe against ours on the dense demo (the same layers, hidden size and attention; the dense MLP as
   wide as demo-moe's two active experts): the cost of routing per sample.
3. `plan` for Mixtral-8x7B, Qwen3-30B-A3B and GPT-OSS-120B on 1 node × 8 GPUs of 80 GB, from configs with their
   published sizes (offline: no download).

    python bench/bench_moe.py [--nsamples 16] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from timing import interleaved

PUBLISHED = {  # the models' published config.json sizes
    "Mixtral-8x7B": ("mixtral", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                                     num_experts_per_tok=2, max_position_embeddings=32768)),
    "Qwen3-30B-A3B": ("qwen3_moe", dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                                        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                                        norm_topk_prob=True, max_position_embeddings=40960, tie_word_embeddings=False)),
    "GPT-OSS-120B": ("gpt_oss", dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=36,
                                     num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=128,
                                     num_experts_per_tok=4)),
}


def reference_wandg(model, samples) -> dict[str, torch.Tensor]:
    """One backward per sample with parameter gradients; Σ |grad| per scored parameter."""
    from safeneurons.models.structure import scored_linears

    scored = {linear.param_name: linear.weight for linear in scored_linears(model)}
    for param in model.parameters():
        param.requires_grad_(False)
    for param in scored.values():
        param.requires_grad_(True)
    sums = {name: torch.zeros_like(param) for name, param in scored.items()}
    for sample in samples:
        model.zero_grad(set_to_none=True)
        model(sample.input_ids[None], labels=sample.labels[None]).loss.backward()
        for name, param in scored.items():
            sums[name] += param.grad.abs()
    for param in model.parameters():
        param.requires_grad_(False)
    return {name: scored[name].detach().abs() * total for name, total in sums.items()}


def wandg_side(model, samples, accumulate_dtype: str = "exact"):
    """Our wandg scores of every scored matrix on `samples` (the statistics and |W| · Σ; the selection that follows
    is the same whichever way the scores were computed, so neither side runs it)."""
    from safeneurons.scores.config import ScoreConfig, targets_of
    from safeneurons.scores.statistics import score_targets

    config = ScoreConfig(method="wandg", data="demo-align", sparsity_ratio=0.1, nsamples=len(samples),
                         max_length=128, accumulate_dtype=accumulate_dtype)
    return lambda: score_targets(model, targets_of(model), samples, config)


def random_mixtral(tokenizer, hidden: int, experts: int, layers: int):
    """A random Mixtral over the demo vocabulary, each expert as wide as its hidden size × 2."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                           num_local_experts=experts, num_experts_per_tok=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    return MixtralForCausalLM(config).eval()


def plan_figures() -> list[str]:
    from transformers import AutoConfig

    from safeneurons.workflows.plan import Cluster, Workload, format_table, plan_report
    from safeneurons.workflows.plan_model import model_shape

    lines = []
    with tempfile.TemporaryDirectory() as root:
        for name, (family, sizes) in PUBLISHED.items():
            folder = Path(root) / name
            AutoConfig.for_model(family, **sizes).save_pretrained(folder)
            report = plan_report(model_shape(str(folder)), Cluster(1, 8), Workload())
            lines += [format_table(report).replace(str(folder), name), ""]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512, help="the random Mixtral's hidden size (default 512)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    from safeneurons.data.samples import load_samples
    from safeneurons.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer("demo-moe")
    moe, dense = load_model("demo-moe").eval(), load_model("demo").eval()
    samples = load_samples("demo-align", tokenizer, args.nsamples, 0, 128)
    timings = interleaved({"ours": wandg_side(moe, samples), "ours_float32_sums": wandg_side(moe, samples, "float32"),
                           "reference": lambda: reference_wandg(moe, samples),
                           "dense": wandg_side(dense, samples)}, args.repeats)
    larger = random_mixtral(tokenizer, args.hidden, args.experts, args.layers)
    larger_timings = interleaved({"ours": wandg_side(larger, samples),
                                  "ours_float32_sums": wandg_side(larger, samples, "float32"),
                                  "reference": lambda: reference_wandg(larger, samples)}, args.repeats)
    ours, reference = timings["ours"].value, timings["reference"].value
    worst = max(float(((ours[name] - score).abs() / score.abs().clamp(min=1e-12)).max())
                for name, score in reference.items() if ".experts." in name)
    active = lambda model: sum(param.numel() for name, param in model.named_parameters()  # noqa: E731
                               if ".experts." not in name) + sum(
        param.numel() * 2 // 4 for name, param in model.named_parameters() if ".experts." in name)
    result = {
        "nsamples": args.nsamples, "threads": torch.get_num_threads(),
        "seconds_per_sample": {label: timing.wall / args.nsamples for label, timing in timings.items()},
        "speedup_over_reference": timings["reference"].wall / timings["ours"].wall,
        "speedup_over_reference_float32_sums": timings["reference"].wall / timings["ours_float32_sums"].wall,
        f"random_mixtral_h{args.hidden}_e{args.experts}_l{args.layers}": {
            "params": sum(param.numel() for param in larger.parameters()),
            "seconds_per_sample": {label: timing.wall / args.nsamples for label, timing in larger_timings.items()},
            "speedup_over_reference": larger_timings["reference"].wall / larger_timings["ours"].wall,
            "speedup_over_reference_float32_sums": (larger_timings["reference"].wall
                                                    / larger_timings["ours_float32_sums"].wall)},
        "moe_over_dense_per_sample": timings["ours"].wall / timings["dense"].wall,
        "active_params": {"demo-moe": active(moe), "demo": sum(param.numel() for param in dense.parameters())},
        "largest_relative_difference_of_expert_scores": worst,
    }
    print(json.dumps(result, indent=2))
    print("\n".join(plan_figures()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
