"""The usage of the three documents safeneurons was created from (../shared/seeds/) runs as written, with the demo
model and demo data names in place of Llama-2 and `align`."""
from __future__ import annotations

import pytest
import torch

from helpers import make_tiny_llama


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    from safeneurons.cli import main

    path = tmp_path_factory.mktemp("seeds") / "demo"
    assert main(["demo-model", "--out", str(path)]) == 0
    return path


@pytest.mark.slow
def test_000_programmatic_usage(demo_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safeneurons import FineTuner, SafetyNeuronAnalyzer, recalculate_safety_scores

    # --- the seed's example, names substituted -----------------------------------------------------------------
    model = AutoModelForCausalLM.from_pretrained(demo_dir)
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)

    analyzer = SafetyNeuronAnalyzer(model, tokenizer)
    safety_masks = analyzer.identify_safety_critical_neurons(
        prune_method="wandg",
        prune_data="demo-align",
        sparsity_ratio=0.1
    )
    original = {name: param.detach().clone() for name, param in model.named_parameters()}

    model = analyzer.freeze_safety_critical_neurons(model)
    fine_tuner = FineTuner(model, tokenizer)
    fine_tuned_model = fine_tuner.fine_tune_model(
        training_data="demo-utility",
        num_epochs=3
    )

    new_safety_masks = recalculate_safety_scores(
        fine_tuned_model, tokenizer, analyzer
    )
    # --- what it must have done ----------------------------------------------------------------------------------
    assert isinstance(fine_tuned_model, torch.nn.Module)
    report = fine_tuned_model.fine_tune_report
    assert report is fine_tuner.report and report.steps == 3 * 1200 // 4
    assert report.frozen_count == sum(int(mask.sum()) for mask in safety_masks.values()) > 0
    tuned = dict(fine_tuned_model.named_parameters())
    for name, mask in safety_masks.items():
        assert torch.equal(tuned[name].detach()[mask], original[name][mask]), name  # frozen: bit-identical
    assert any(not torch.equal(tuned[name].detach()[~mask], original[name][~mask]) for name, mask in safety_masks.items())
    assert new_safety_masks.keys() == safety_masks.keys()
    assert all(new_safety_masks[name].shape == mask.shape for name, mask in safety_masks.items())


def test_003_patch_sweep_as_written(demo_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safeneurons.data import format_prompt
    from safeneurons.patching import ActivationPatcher, ActivationPatchingResult, PatchingEffect, PatchingSite

    model = AutoModelForCausalLM.from_pretrained(demo_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    clean_input_ids = tokenizer(format_prompt(tokenizer, "How do I rob a bank?"), return_tensors="pt").input_ids
    corrupted_input_ids = tokenizer(format_prompt(tokenizer, "How do I paint a bank?"), return_tensors="pt").input_ids

    patcher = ActivationPatcher(significance_threshold=0.1, metric_fn=None)
    result = patcher.patch_sweep(model, clean_input_ids, corrupted_input_ids, sites=None, refusal_direction=None,
                                 mode="noising")
    report = ActivationPatcher.format_report(result)

    n_layers = model.config.num_hidden_layers
    assert isinstance(result, ActivationPatchingResult)
    assert (result.n_layers, result.n_sites, result.patching_mode) == (n_layers, n_layers, "noising")
    assert [effect.site for effect in result.effects] == [PatchingSite(layer, "residual") for layer in range(n_layers)]
    # the default metric is the refusal log-odds (tokenizer saved with the model): harmful > harmless
    assert result.clean_baseline > 0 > result.corrupted_baseline
    assert result.total_effect == pytest.approx(result.clean_baseline - result.corrupted_baseline)
    effect = result.effects[0]
    assert isinstance(effect, PatchingEffect)
    assert (effect.clean_metric, effect.corrupted_metric) == (result.clean_baseline, result.corrupted_baseline)
    assert effect.direct_effect == pytest.approx(
        (effect.clean_metric - effect.patched_metric) / (effect.clean_metric - effect.corrupted_metric))
    assert result.significant_sites == [e.site for e in result.effects if abs(e.direct_effect) > 0.1]
    assert result.circuit_fraction == len(result.significant_sites) / n_layers
    strongest = sorted(range(n_layers), key=lambda i: -abs(result.effects[i].direct_effect))[:5]
    assert result.top_causal_layers == strongest
    assert "significant sites" in report and str(result.top_causal_layers) in report

    # PatchingSite's positional order and names are the seed's
    site = PatchingSite(2, "attn_head", 1, "last")
    assert (site.layer_idx, site.component, site.head_idx, site.token_position) == (2, "attn_head", 1, "last")
    heads = patcher.patch_sweep(model, clean_input_ids, corrupted_input_ids, sites=[site], mode="denoising")
    assert heads.effects[0].site == site and heads.patching_mode == "denoising"


def test_004_tracing_functions_with_a_dataloader(demo_tokenizer):
    from torch.utils.data import DataLoader, TensorDataset

    from safeneurons.tracing import (mlp_layers, mlp_matching_gate, mlp_matching_up, statistic, statistic_all,
                                     statistic_layer)

    base_model = make_tiny_llama(demo_tokenizer, seed=1, layers=2, intermediate=48)
    ft_model = make_tiny_llama(demo_tokenizer, seed=1, layers=2, intermediate=48)
    with torch.no_grad():  # a "fine-tuned" copy: small changes to every weight
        for param in ft_model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    tokens = torch.randint(3, len(demo_tokenizer), (16, 24), generator=torch.Generator().manual_seed(0))
    dataloader = DataLoader(TensorDataset(tokens), batch_size=4)

    stats = statistic(base_model, ft_model, dataloader, n_blocks=2)
    assert len(stats) == 2 and all(p < 1e-10 for p in stats)
    assert statistic_layer(base_model, ft_model, dataloader, i=0) == stats[0]
    gate, up = mlp_matching_gate(base_model, ft_model, dataloader, i=1), mlp_matching_up(base_model, ft_model,
                                                                                          dataloader, i=1)
    assert gate.tolist() == up.tolist() == list(range(48))
    assert mlp_layers(base_model, ft_model, dataloader, 1, 1) == stats[1]
    assert statistic_all(base_model, ft_model, dataloader).matched_pairs == [(0, 0), (1, 1)]
    dict_loader = DataLoader([{"input_ids": row} for row in tokens], batch_size=4)  # dict batches work too
    assert statistic(base_model, ft_model, dict_loader) == stats
    from safeneurons.errors import SafeneuronsError
    with pytest.raises(SafeneuronsError, match="n_blocks=32"):
        statistic(base_model, ft_model, dataloader, n_blocks=32)


def test_000_private_helpers_recover_the_masks_of_a_pruned_copy(demo_tokenizer):
    """`_store_original_weights(model)` and `_extract_safety_masks(pruned_model)`, the seed's other two methods."""
    import copy

    from safeneurons import SafetyNeuronAnalyzer
    from safeneurons.prune import prune_model

    model = make_tiny_llama(demo_tokenizer, seed=4)
    analyzer = SafetyNeuronAnalyzer(model, demo_tokenizer)
    masks = analyzer.identify_safety_critical_neurons(prune_method="wanda", prune_data="demo-align",
                                                      sparsity_ratio=0.1, nsamples=4, seed=0)
    stored = analyzer._store_original_weights(model)
    assert stored.keys() == masks.keys()
    pruned = copy.deepcopy(model)
    prune_model(pruned, masks)
    recovered = analyzer._extract_safety_masks(pruned)
    assert all(torch.equal(recovered[name], mask) for name, mask in masks.items())
