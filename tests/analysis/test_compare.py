"""compare: overlap and Jaccard of hand-made masks against hand counts, weight drift, the summary file, the CLI."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import make_tiny_llama
from safeneurons import cli
from safeneurons.analysis.compare import (PLOT_FILE, SUMMARY_FILE, analysis_summary, compare_masks, layer_of, module_of,
                                          weight_drift)
from safeneurons.masks.io import save_masks

Q0, UP0 = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"
ORIGINAL_KEYS = {"original_safety_critical_count": int, "new_safety_critical_count": int, "total_neurons": int,
                 "prune_method": str, "prune_data": str, "sparsity_ratio": float, "training_data": str,
                 "num_epochs": int, "learning_rate": float}


def _bool(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


BEFORE = {Q0: _bool([[1, 1, 0], [0, 0, 1]]), UP0: _bool([[1, 0], [0, 1]]), Q1: _bool([[1, 1, 1], [0, 0, 0]])}
AFTER = {Q0: _bool([[1, 0, 0], [0, 1, 1]]), UP0: _bool([[0, 0], [0, 0]]), Q1: _bool([[1, 1, 0], [1, 0, 0]])}
# Hand counts: Q0 |A|=3 |B|=3 |A∩B|=2 |A∪B|=4; UP0 |A|=2 |B|=0 ∩=0 ∪=2; Q1 |A|=3 |B|=3 ∩=2 ∪=4.


def test_overlap_and_jaccard_equal_the_hand_counts():
    result = compare_masks(BEFORE, AFTER)
    overall = result.overall
    assert (overall.before, overall.after, overall.intersection, overall.union, overall.total) == (8, 6, 4, 10, 16)
    assert overall.overlap == 4 / 8 and overall.jaccard == 4 / 10
    layer0, layer1 = result.per_layer["0"], result.per_layer["1"]
    assert (layer0.overlap, layer0.jaccard) == (2 / 5, 2 / 6)
    assert (layer1.overlap, layer1.jaccard) == (2 / 3, 2 / 4)
    assert (result.per_module["q_proj"].overlap, result.per_module["q_proj"].jaccard) == (4 / 6, 4 / 8)
    assert (result.per_module["up_proj"].overlap, result.per_module["up_proj"].jaccard) == (0.0, 0.0)


def test_empty_masks_have_no_overlap_value():
    empty = {Q0: torch.zeros(2, 3, dtype=torch.bool)}
    result = compare_masks(empty, empty)
    assert result.overall.overlap is None and result.overall.jaccard is None


def test_mask_files_and_pt_dicts_give_the_same_comparison(tmp_path):
    save_masks(BEFORE, tmp_path / "before")
    torch.save(AFTER, tmp_path / "after.pt")
    from_files = compare_masks(tmp_path / "before", tmp_path / "after.pt")
    assert from_files.to_json() == compare_masks(BEFORE, AFTER).to_json()


def test_names_of_layers_and_modules():
    assert (layer_of(UP0), module_of(UP0)) == ("0", "up_proj")
    assert layer_of("model.embed_tokens.weight") == "other"


def test_drift_of_frozen_and_free_weights_equals_the_hand_values():
    before = {Q0: torch.zeros(2, 3), UP0: torch.zeros(2, 2), Q1: torch.zeros(2, 3)}
    after = {Q0: torch.tensor([[0.0, 0.0, 1.0], [2.0, -2.0, 0.0]]), UP0: torch.tensor([[0.0, 3.0], [-1.0, 0.0]]),
             Q1: torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.5, -0.5]])}
    drift = weight_drift(before, after, BEFORE)
    # Frozen (BEFORE's 8 elements) did not move; the 8 free elements moved by 1+2+2+3+1+0.5·3 = 10.5 in all.
    assert (drift.frozen_count, drift.free_count) == (8, 8)
    assert (drift.mean_abs_change_frozen, drift.max_abs_change_frozen) == (0.0, 0.0)
    assert drift.mean_abs_change_free == pytest.approx(10.5 / 8)
    assert drift.max_abs_change_free == 3.0


def test_drift_reads_model_folders_parameter_by_parameter(tmp_path, demo_tokenizer):
    base = make_tiny_llama(demo_tokenizer, seed=0)
    tuned = make_tiny_llama(demo_tokenizer, seed=0)
    name = "model.layers.1.mlp.down_proj.weight"
    mask = torch.zeros_like(dict(tuned.named_parameters())[name], dtype=torch.bool)
    mask[:, ::2] = True
    with torch.no_grad():
        dict(tuned.named_parameters())[name][~mask] += 0.25
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    drift = weight_drift(tmp_path / "base", tmp_path / "tuned", {name: mask})
    assert drift.max_abs_change_frozen == 0.0
    assert drift.mean_abs_change_free == pytest.approx(0.25, rel=1e-6)
    assert drift.free_count == int((~mask).sum())


def test_analysis_summary_has_the_original_keys_with_their_types():
    metadata = {"prune_method": "wandg", "prune_data": "align", "sparsity_ratio": 0.1,
                "training_data": "alpaca_cleaned_no_safety", "num_epochs": 3, "learning_rate": 2e-5}
    summary = analysis_summary(compare_masks(BEFORE, AFTER), metadata)
    assert list(summary)[:9] == list(ORIGINAL_KEYS)
    assert all(isinstance(summary[key], kind) for key, kind in ORIGINAL_KEYS.items())
    assert (summary["overlap"], summary["jaccard"]) == (0.5, 0.4)


def test_compare_cli_writes_summary_and_plot(tmp_path):
    save_masks(BEFORE, tmp_path / "a")
    save_masks(AFTER, tmp_path / "b")
    assert cli.main(["compare", "--before", str(tmp_path / "a"), "--after", str(tmp_path / "b"),
                     "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    assert (summary["original_safety_critical_count"], summary["new_safety_critical_count"]) == (8, 6)
    assert summary["per_layer"]["1"]["jaccard"] == 0.5
    assert (tmp_path / "out" / PLOT_FILE).read_bytes()[:4] == b"\x89PNG"


def test_compare_cli_rejects_masks_of_different_parameters(tmp_path, capsys):
    save_masks(BEFORE, tmp_path / "a")
    save_masks({Q0: AFTER[Q0]}, tmp_path / "b")
    assert cli.main(["compare", "--before", str(tmp_path / "a"), "--after", str(tmp_path / "b"),
                     "--out", str(tmp_path / "out")]) == 2
    assert "same parameters" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_recalculate_safety_scores_uses_the_analyzers_settings(demo_tokenizer):
    from safeneurons import SafetyNeuronAnalyzer, recalculate_safety_scores
    from safeneurons.scores.config import ScoreConfig
    from safeneurons.scores.schedules import score_model

    model, other = make_tiny_llama(demo_tokenizer, seed=0), make_tiny_llama(demo_tokenizer, seed=1)
    analyzer = SafetyNeuronAnalyzer(model, demo_tokenizer)
    analyzer.identify_safety_critical_neurons("wanda", "demo-align", sparsity_ratio=0.25, nsamples=3, seed=5)
    rescored = recalculate_safety_scores(other, demo_tokenizer, analyzer)
    expected = score_model(other, demo_tokenizer, ScoreConfig("wanda", "demo-align", 0.25, nsamples=3, seed=5)).masks
    assert rescored.keys() == expected.keys()
    assert all(torch.equal(rescored[name], expected[name]) for name in expected)
