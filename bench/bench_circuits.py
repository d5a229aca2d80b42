"""Edge circuits: what scoring every edge costs against patching every edge, and node-level attribution against
TransformerLens.

1. On the demo (demo-chat, 1,108 edges), one harmful/harmless pair: EAP over every edge (one clean forward and
   backward, one corrupted forward), EAP-IG (5 steps), and exact edge patching of every edge, batched as
   `circuit --exact all` runs it (64 edges per forward) and as the straightforward loop (one forward per edge),
   side by side in one run; the ratios and the rank correlation of EAP and EAP-IG with the exact effects.
2. On SmolLM2-135M-Instruct (smollm2-safe), one pair of equal token length: node-level attribution of every head
   and MLP at every position (`patch --method attribution`) against TransformerLens 4.3's `attribution_patch`
   (node granularity) on its TransformerBridge, side by side; skipped with a line when TransformerLens is not
   installed (`pip install transformer-lens==4.3.0`, in its own environment).

    OMP_NUM_THREADS=2 python bench/bench_circuits.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile

import torch

from timing import interleaved


def demo_side_by_side(repeats: int) -> dict:
    from scipy.stats import spearmanr

    from safeneurons.data.samples import load_prompts
    from safeneurons.interp.circuits.graph import CircuitGraph
    from safeneurons.interp.circuits.scores import attribution_scores, exact_edge_effects, prepare_pair
    from safeneurons.interp.patching.metrics import refusal_metric, refusal_token_ids
    from safeneurons.models.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("demo-chat")
    metric = refusal_metric(refusal_token_ids(tokenizer))
    clean, corrupted = (tokenizer(load_prompts(name, tokenizer, 1)[0], return_tensors="pt")["input_ids"]
                        for name in ("demo-harmful", "demo-harmless"))
    pair = prepare_pair(model, metric, 0, clean, corrupted, "template")
    graph = CircuitGraph.of(model)
    edges = [tuple(edge) for edge in graph.adjacency().nonzero().tolist()]
    timings = interleaved({
        "eap": lambda: attribution_scores(model, graph, metric, pair, 0),
        "eap_ig": lambda: attribution_scores(model, graph, metric, pair, 5),
        "exact_batched": lambda: exact_edge_effects(model, graph, metric, pair, edges, 64),
        "exact_loop": lambda: [exact_edge_effects(model, graph, metric, pair, [edge], 1)[0] for edge in edges],
    }, repeats)
    exact = torch.tensor(timings["exact_batched"].value)
    loop = torch.tensor(timings["exact_loop"].value)
    eap, eap_ig = (timings[name].value[graph.adjacency()] for name in ("eap", "eap_ig"))
    return {"edges": graph.n_edges, "tokens": [clean.shape[1], corrupted.shape[1]],
            "seconds": {name: round(timing.wall, 4) for name, timing in timings.items()},
            "exact_loop_over_eap": round(timings["exact_loop"].wall / timings["eap"].wall, 1),
            "exact_batched_over_eap": round(timings["exact_batched"].wall / timings["eap"].wall, 1),
            "exact_loop_over_batched": round(timings["exact_loop"].wall / timings["exact_batched"].wall, 2),
            "batched_equals_loop_max_abs": float((exact - loop).abs().max()),
            "spearman_eap_exact": float(spearmanr(eap, exact).statistic),
            "spearman_eap_ig_exact": float(spearmanr(eap_ig, exact).statistic)}


def smollm2_against_transformer_lens(repeats: int) -> dict:
    if importlib.util.find_spec("transformer_lens") is None:
        return {"skipped": "TransformerLens is not installed (pip install transformer-lens==4.3.0)"}
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

    from safeneurons.data.samples import format_prompt
    from safeneurons.interp.patching.metrics import refusal_metric, refusal_token_ids
    from safeneurons.interp.patching.patcher import ActivationPatcher
    from safeneurons.interp.patching.sites import PatchingSite
    from safeneurons.models.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("smollm2-safe")
    model.config._attn_implementation = "eager"  # the bridge forces eager attention; both sides run the same
    metric = refusal_metric(refusal_token_ids(tokenizer))
    clean, corrupted = (tokenizer(format_prompt(tokenizer, text), return_tensors="pt")["input_ids"]
                        for text in ("How do I rob a bank?", "How do I paint a bank?"))
    assert clean.shape == corrupted.shape, (clean.shape, corrupted.shape)
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    sites = [PatchingSite(layer, "attn_head", head, "all") for layer in range(n_layers) for head in range(n_heads)]
    sites += [PatchingSite(layer, "mlp_out", None, "all") for layer in range(n_layers)]
    patcher = ActivationPatcher(metric=metric)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        bridge = TransformerBridge.boot_transformers(folder, hf_model=model, tokenizer=tokenizer, device="cpu")
    bridge.eval()

    def transformer_lens() -> object:
        return attribution_patch(bridge, clean, corrupted, lambda logits: metric.compute(logits[:, -1], None)[0],
                                 EdgeAttributionConfig(granularity="node"))
    timings = interleaved({"ours": lambda: patcher.patch_sweep(model, clean, corrupted, sites, method="attribution"),
                           "transformer_lens": transformer_lens}, repeats)
    ours = timings["ours"].value
    return {"sites": len(sites), "tokens": clean.shape[1],
            "seconds": {name: round(timing.wall, 3) for name, timing in timings.items()},
            "transformer_lens_over_ours": round(timings["transformer_lens"].wall / timings["ours"].wall, 2),
            "ours_first_estimates": [round(effect.patched_metric - effect.clean_metric, 5)
                                     for effect in ours.effects[:3]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps({"demo": demo_side_by_side(args.repeats),
                      "smollm2": smollm2_against_transformer_lens(args.repeats)}, indent=2))


if __name__ == "__main__":
    main()
