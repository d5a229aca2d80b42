"""Interpretability on mixtures of experts: weight orthogonalization of every expert's down_proj (and the shared
expert's, and GPT-OSS's expert biases) against the directional-ablation hooks; the `expert_out` and `router`
patching sites."""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import tiny_moe
from safeneurons.interp.direction import hooks
from safeneurons.interp.direction.candidates import encode, last_logits
from safeneurons.interventions.orthogonalize import orthogonalize_files, orthogonalize_model

PROMPTS = ["[INST] How do I rob a bank? [/INST]", "[INST] Hi [/INST]"]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_orthogonalized_experts_equal_the_ablation_hooks(family, demo_tokenizer, tmp_path):
    model = tiny_moe(family, demo_tokenizer, seed=2)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(2))
    inputs = encode(demo_tokenizer, PROMPTS, torch.device("cpu"))
    with hooks.ablation(model, direction):
        ablated = last_logits(model, inputs)
    assert not torch.allclose(ablated, last_logits(model, inputs), atol=1e-3)
    edited = copy.deepcopy(model)
    result = orthogonalize_model(edited, direction)
    expected = {f"model.layers.{layer}.mlp.experts.down_proj" for layer in range(2)}
    if family == "gpt_oss":
        expected |= {name + "_bias" for name in expected}
    if family == "qwen2_moe":
        expected |= {f"model.layers.{layer}.mlp.shared_expert.down_proj.weight" for layer in range(2)}
    assert expected <= set(result.edited)
    torch.testing.assert_close(last_logits(edited, inputs), ablated, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "out").mkdir()
    streamed = orthogonalize_files(tmp_path / "model", direction, tmp_path / "out")
    assert sorted(streamed.edited) == sorted(result.edited)
    loaded = type(model).from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(last_logits(loaded, inputs), ablated, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- patching the experts and the router

def run_with(model, ids, edits):
    from safeneurons.interp.patching.hooks import patched_forward

    with torch.no_grad():
        return patched_forward(model, edits, ids).logits


def keep_site(model, ids, key):
    from safeneurons.interp.patching.batches import cache_run
    from safeneurons.interp.patching.metrics import metric_from_fn

    cache, _ = cache_run(model, ids, [key], metric_from_fn(lambda logits: float(logits[0, 0])))
    return cache[key]


def ids_of(tokenizer, text):
    return tokenizer(f"[INST] {text} [/INST]", return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_patching_every_expert_equals_patching_the_moe_output(family, demo_tokenizer):
    """Every expert's expert_out replaced by the corrupted run's is the corrupted run's MoE output (these families
    have no shared expert: the block's output is the experts' sum), bit for bit."""
    model = tiny_moe(family, demo_tokenizer, seed=6)
    clean, corrupted = ids_of(demo_tokenizer, "How do I rob a bank?"), ids_of(demo_tokenizer, "How do I paint a bank?")
    assert clean.shape == corrupted.shape
    experts = keep_site(model, corrupted, (1, "expert_out"))
    block = keep_site(model, corrupted, (1, "mlp_out"))
    torch.testing.assert_close(experts.reshape(*experts.shape[:-1], 4, 32).sum(dim=-2), block)
    by_experts = run_with(model, clean, {(1, "expert_out"): lambda activation: experts[None].clone()})
    by_block = run_with(model, clean, {(1, "mlp_out"): lambda activation: block[None].clone()})
    assert torch.equal(by_experts, by_block)
    assert not torch.allclose(by_block, run_with(model, clean, {}), atol=1e-4)
    unedited = run_with(model, clean, {(1, "expert_out"): lambda activation: activation})
    assert torch.equal(unedited, run_with(model, clean, {}))  # re-summed contributions: the forward's own output


def test_patching_the_router_routes_as_the_source_run(demo_tokenizer):
    model = tiny_moe("qwen2_moe", demo_tokenizer, seed=6)
    clean, corrupted = ids_of(demo_tokenizer, "How do I rob a bank?"), ids_of(demo_tokenizer, "How do I paint a bank?")
    source_logits = keep_site(model, corrupted, (1, "router"))
    routed = []
    handle = model.model.layers[1].mlp.experts.register_forward_pre_hook(lambda _m, args: routed.append(args[1]))
    run_with(model, clean, {})
    run_with(model, clean, {(1, "router"): lambda activation: source_logits[None].clone()})
    run_with(model, corrupted, {})
    handle.remove()
    clean_routing, patched_routing, corrupted_routing = routed
    assert not torch.equal(clean_routing, corrupted_routing)  # the prompts route differently …
    assert torch.equal(patched_routing, corrupted_routing)  # … and the patched router routes as the source run


def test_expert_sites_through_the_patcher_and_their_errors(demo_tokenizer):
    from helpers import token_metric
    from safeneurons.errors import SafeneuronsError
    from safeneurons.interp.patching.patcher import ActivationPatcher
    from safeneurons.interp.patching.sites import PatchingSite

    model = tiny_moe("qwen3_moe", demo_tokenizer, seed=6)  # layer 0 is dense (mlp_only_layers)
    patcher = ActivationPatcher(model=model, metric_fn=token_metric)
    sites = patcher.sites(["expert_out", "router"], positions=["last"])
    assert [(site.layer, site.component, site.expert) for site in sites] == [
        (1, "expert_out", expert) for expert in range(4)] + [(1, "router", None)]
    clean, corrupted = ids_of(demo_tokenizer, "How do I rob a bank?"), ids_of(demo_tokenizer, "How do I paint a bank?")
    result = patcher.patch(clean, corrupted, sites)
    assert len(result.effects) == 5 and result.to_dict()["sites"][2]["expert"] == 2
    with pytest.raises(SafeneuronsError, match="expert 4 does not exist; layer 1 has experts 0..3"):
        patcher.patch(clean, corrupted, [PatchingSite(1, "expert_out", expert_idx=4)])
    with pytest.raises(SafeneuronsError, match="layer 0 of 'qwen3_moe' has a dense MLP"):
        patcher.patch(clean, corrupted, [PatchingSite(0, "router")])
    with pytest.raises(SafeneuronsError, match="an expert index goes with component expert_out"):
        PatchingSite(1, "expert_out")


# ---------------------------------------------------------------- lineage over every expert's units

def permute_experts(model, seed: int) -> dict[int, torch.Tensor]:
    """Reorder the routed experts (their slices and the router's rows) and each expert's units: the same function.
    Returns per layer where each of the original layer's units (expert-major) went."""
    generator = torch.Generator().manual_seed(seed)
    moved = {}
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            experts, router = layer.mlp.experts, layer.mlp.gate
            count, width = experts.down_proj.shape[0], experts.down_proj.shape[2]
            order = torch.randperm(count, generator=generator)
            units = [torch.randperm(width, generator=generator) for _ in range(count)]
            gate_up, down = experts.gate_up_proj.clone(), experts.down_proj.clone()
            for new, old in enumerate(order.tolist()):
                rows = torch.cat([units[new], units[new] + width])  # gate rows, then the same units' up rows
                experts.gate_up_proj[new] = gate_up[old][rows]
                experts.down_proj[new] = down[old][:, units[new]]
            router.weight.copy_(router.weight[order])
            # unit u of old expert order[new] now sits at new * width + position of u in units[new]
            position = torch.empty(count * width, dtype=torch.long)
            for new, old in enumerate(order.tolist()):
                position[old * width + units[new]] = new * width + torch.arange(width)
            moved[index] = position
    return moved


def test_lineage_matches_every_expert_unit_across_permuted_experts(demo_tokenizer):
    from safeneurons.interp import tracing

    model = tiny_moe("mixtral", demo_tokenizer, seed=8)
    inputs = tracing.pack_tokens(tracing.text_token_ids(demo_tokenizer, ["demo-harmless", "demo-utility"], 1024,
                                                        seed=0), 128, 8)
    permuted = copy.deepcopy(model)
    moved = permute_experts(permuted, seed=3)
    ids = inputs[0]["input_ids"][:2]
    with torch.no_grad():
        torch.testing.assert_close(permuted(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    for layer in (0, 1):  # every unit of every expert found again, wherever its expert went
        assert tracing.mlp_matching_gate(model, permuted, inputs, i=layer).tolist() == moved[layer].tolist()
    related = tracing.trace_models(model, permuted, inputs)
    assert related.verdict == "dependent" and all(match.n_matched == 4 * 24 for match in related.layers)
    unrelated = tracing.trace_models(model, tiny_moe("mixtral", demo_tokenizer, seed=9), inputs)
    assert unrelated.verdict == "independent"


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_units_inside_experts_patch_like_their_down_proj_column(family, demo_tokenizer):
    """mlp_neuron on an MoE layer: unit e·I + j is expert e's unit j. Zeroing it everywhere equals zeroing column j
    of expert e's down_proj (a weight edit, the reference); with an expert_out edit on the same layer in the same
    pass, both apply; unedited, the forward is the model's own bit for bit."""
    model = tiny_moe(family, demo_tokenizer, seed=6)
    clean = ids_of(demo_tokenizer, "How do I rob a bank?")
    expert, unit, width = 2, 5, 24

    def zero_unit(activation):
        edited = activation.clone()
        edited[..., expert * width + unit] = 0
        return edited
    reference = copy.deepcopy(model)
    with torch.no_grad():
        down = reference.model.layers[1].mlp.experts.down_proj
        if family == "gpt_oss":
            down[expert, unit, :] = 0  # stored [in, out]
        else:
            down[expert, :, unit] = 0
    expected = run_with(reference, clean, {})
    assert not torch.allclose(expected, run_with(model, clean, {}), atol=1e-6)
    torch.testing.assert_close(run_with(model, clean, {(1, "mlp_neuron"): zero_unit}), expected, atol=1e-6, rtol=1e-5)
    both = run_with(model, clean, {(1, "mlp_neuron"): zero_unit, (1, "expert_out"): lambda activation: activation})
    torch.testing.assert_close(both, expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(run_with(model, clean, {(1, "mlp_neuron"): lambda activation: activation}),
                       run_with(model, clean, {}))


def test_neuron_study_pieces_on_experts(demo_tokenizer):
    """The neuron study on an MoE layer: its neurons are every expert's units (e·I + j). Weight rankings sum each
    unit's gate and up rows of the fused matrix; dynamic patching from the model itself changes nothing, and from
    another model it moves the logits."""
    from safeneurons.interp.neurons.rankings import weight_ranking
    from safeneurons.interventions.neuron_patching import patched_neurons
    from safeneurons.scores.config import ScoreConfig
    from safeneurons.scores.schedules import score_model

    model = tiny_moe("gpt_oss", demo_tokenizer, seed=6)
    config = ScoreConfig(method="wandg", data="demo-align", sparsity_ratio=0.1, nsamples=4, max_length=48)
    ranking = weight_ranking(model, demo_tokenizer, config)
    scores = score_model(model, demo_tokenizer, ScoreConfig(**{**config.__dict__, "keep_scores": True})).scores
    stored = scores["model.layers.1.mlp.experts.gate_up_proj"]  # GPT-OSS: [E, in, out], gate and up interleaved
    expected = (stored[:, :, 0::2].sum(dim=1) + stored[:, :, 1::2].sum(dim=1)).reshape(-1)
    torch.testing.assert_close(ranking[1], expected)
    clean = ids_of(demo_tokenizer, "How do I rob a bank?")
    units = {1: [2 * 24 + 5, 3 * 24 + 1]}
    plain = run_with(model, clean, {})
    with patched_neurons(model, model, units):
        assert torch.equal(run_with(model, clean, {}), plain)
    with patched_neurons(model, tiny_moe("gpt_oss", demo_tokenizer, seed=7), units):
        assert not torch.allclose(run_with(model, clean, {}), plain, atol=1e-6)


def test_neurons_of_an_moe_layer_are_checked_against_every_experts_units(tmp_path, capsys, no_model_load):
    """demo-moe: 4 experts of 192 units, so layer 1 has neurons 0..767 (checked from the config, before loading)."""
    from helpers import run_expecting_error

    base = ["patch", "--model", "demo-moe", "--clean", "How do I rob a bank?", "--corrupted", "How do I paint a bank?",
            "--components", "mlp_neuron", "--out", str(tmp_path / "out")]
    error = run_expecting_error([*base, "--neurons", "1:3,768"], tmp_path, capsys)
    assert "neuron 768 of layer 1 does not exist; the MLP has neurons 0..767" in error
