"""The neuron study: its rankings against references written here, its verdict, the command end to end on the demo
pair (2 ranks = 1 rank) and its bad input."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import run_expecting_error, run_ranks
from safeneurons import cli
from safeneurons.interp.neurons.rankings import set_difference, weight_ranking
from safeneurons.interp.neurons.study import NeuronStudyResult, verdict_lines
from safeneurons.masks.neurons import layer_count, top_fraction


def test_set_difference_ranks_the_utility_top_last_in_safety_order():
    generator = torch.Generator().manual_seed(0)
    safety = {layer: torch.randn(50, generator=generator) for layer in range(3)}
    utility = {layer: torch.randn(50, generator=generator) for layer in range(3)}
    ranked = set_difference(safety, utility, 0.2)
    for layer in range(3):
        excluded = set(torch.argsort(utility[layer], descending=True)[:10].tolist())
        by_safety = torch.argsort(safety[layer], descending=True).tolist()
        expected = [j for j in by_safety if j not in excluded] + [j for j in by_safety if j in excluded]
        assert torch.argsort(ranked[layer], descending=True).tolist() == expected
    assert top_fraction(ranked, 0.8) == {layer: sorted(j for j in range(50) if j not in set(
        torch.argsort(utility[layer], descending=True)[:10].tolist())) for layer in range(3)}


def test_wanda_neuron_ranking_equals_a_reference_written_here(demo_model, demo_tokenizer):
    """A neuron's wanda score: Σ over its gate and up rows of |W_ji| · sqrt(mean over samples of Σ_response x_i²),
    x the MLP's input, hooked here on the model directly."""
    from safeneurons.data.samples import load_samples

    from safeneurons.scores.config import ScoreConfig

    ranked = weight_ranking(demo_model, demo_tokenizer, ScoreConfig("wanda", "demo-align", 0.5, nsamples=4,
                                                                    max_length=64))
    samples = load_samples("demo-align", demo_tokenizer, 4, 0, 64)
    layers = demo_model.model.layers
    squares = {layer: torch.zeros(demo_model.config.hidden_size, dtype=torch.float64) for layer in range(len(layers))}
    current = {}

    def keep(index):
        def hook(_module, args):
            squares[index].add_((args[0][0][current["rows"]].double() ** 2).sum(0))
        return hook

    handles = [layer.mlp.register_forward_pre_hook(keep(index)) for index, layer in enumerate(layers)]
    with torch.no_grad():
        for sample in samples:
            current["rows"] = sample.response_mask
            demo_model(input_ids=sample.input_ids[None])
    for handle in handles:
        handle.remove()
    for index, layer in enumerate(layers):
        norm = torch.sqrt(squares[index] / len(samples))
        expected = sum((layer.mlp.get_submodule(part).weight.double().abs() * norm).sum(1)
                       for part in ("gate_proj", "up_proj"))
        torch.testing.assert_close(ranked[index].double(), expected, rtol=1e-4, atol=1e-6)


def _point(direction, ranking, k, rate, interval, seed=None):
    return {"direction": direction, "ranking": ranking, "seed": seed, "fraction": k, "n_neurons": 6,
            "n_prompts": 50, "refusal_rate": rate, "refusal_interval": interval, "asr": 0.0, "asr_interval": [0, 0]}


def test_the_verdict_says_plainly_when_a_ranking_is_no_better_than_random():
    plain = {"chat": _point("", "", 0, 1.0, [0.93, 1.0]), "base": _point("", "", 0, 0.0, [0.0, 0.07])}
    points = [_point("restore", "wandg", 0.05, 0.60, [0.46, 0.72]), _point("restore", "wandg", 0.2, 0.9, [0.79, 0.96]),
              _point("restore", "wanda", 0.05, 0.10, [0.04, 0.21]), _point("restore", "wanda", 0.2, 0.2, [0.11, 0.33]),
              _point("remove", "wandg", 0.05, 0.96, [0.87, 0.99]), _point("remove", "wandg", 0.2, 0.5, [0.37, 0.63]),
              _point("remove", "wanda", 0.05, 1.0, [0.93, 1.0]), _point("remove", "wanda", 0.2, 0.94, [0.84, 0.98])]
    pooled = [{**_point(direction, "random", k, 0.1 if direction == "restore" else 0.95,
                        [0.06, 0.16] if direction == "restore" else [0.91, 0.97]), "seed_rates": []}
              for direction in ("restore", "remove") for k in (0.05, 0.2)]
    result = NeuronStudyResult("chat", "base", {"fractions": [0.05, 0.2], "rankings": ["wandg", "wanda"],
                                                "random_seeds": [0, 1, 2]}, plain, points, pooled, {}, {})
    lines = verdict_lines(result)
    assert "- wandg is better than random at k = 5%, 20% (at k = 20%: 0.90 [0.79, 0.96] vs random 0.10 [0.06, " \
           "0.16])." in lines
    assert "- wanda is no better than random at any k (at k = 20%: 0.20 [0.11, 0.33] vs random 0.10 [0.06, " \
           "0.16])." in lines  # above random's rate, but the intervals overlap
    assert "- wandg is better than random at k = 20% (at k = 20%: 0.50 [0.37, 0.63] vs random 0.95 [0.91, 0.97])." \
        in lines
    assert any(line.startswith("- wanda is no better than random at any k (at k = 20%: 0.94") for line in lines)


STUDY = ["neurons", "--model", "demo-chat", "--base-model", "demo-base", "--prompts", "demo-harmful",
         "--eval-limit", "6", "--data", "demo-align", "--utility-data", "demo-utility", "--nsamples", "8",
         "--fractions", "0.05,0.2", "--max-new-tokens", "16", "--batch-size", "2", "--score-batch-size", "4",
         "--max-length", "64"]


@pytest.mark.slow
def test_neuron_study_end_to_end_and_two_ranks_equal_one_rank(tmp_path):
    assert cli.main([*STUDY, "--out", str(tmp_path / "one")]) == 0
    result = run_ranks(["safeneurons.cli", *STUDY, "--out", str(tmp_path / "two")], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.loads((tmp_path / name / "neuron_patching.json").read_text()) for name in ("one", "two"))
    for report in (one, two):
        report.pop("seconds_per_prompt")
    assert one == two
    assert (tmp_path / "one" / "neuron_patching.png").stat().st_size > 10_000
    assert one["plain"]["chat"]["refusal_rate"] == 1.0 and one["plain"]["base"]["refusal_rate"] == 0.0
    rankings = ["wandg", "wanda", "setdiff", "contrast", "random"]
    assert {(p["direction"], p["ranking"], p["fraction"]) for p in one["points"]} == {
        (d, r, k) for d in ("restore", "remove") for r in rankings for k in (0.05, 0.2)}
    for point in one["points"]:  # every ranking and the random control patch the same neurons per layer
        assert point["n_neurons"] == 6 * layer_count(384, point["fraction"])
    for pooled in one["random_pooled"]:
        assert pooled["n_prompts"] == 18 and pooled["refusal_rate"] == pytest.approx(
            sum(pooled["seed_rates"]) / 3)
    assert set(one["overlaps"]["0.2"]) >= {"wandg|wanda", "wandg|setdiff", "contrast|random"}
    assert any("better than random" in line for line in one["verdict"])


def test_neuron_study_bad_input_exits_2_before_loading(tmp_path, capsys, demo_tokenizer):
    from helpers import make_tiny_llama

    model = make_tiny_llama(demo_tokenizer, seed=1, layers=2, intermediate=64)
    model.save_pretrained(tmp_path / "tiny")
    base = [*STUDY[:-2], "--out", str(tmp_path / "out")]
    other = [*base[:4], str(tmp_path / "tiny"), *base[5:]]
    assert "differ in structure" in run_expecting_error(other, tmp_path, capsys)
    wrong = [*base, "--fractions", "0,0.5"]
    assert "fractions in (0, 1]" in run_expecting_error(wrong, tmp_path, capsys)
    assert "ranking 'snip' is not one of" in run_expecting_error([*base, "--rankings", "wandg,snip"], tmp_path,
                                                                 capsys)
    assert "no-such-set" in run_expecting_error([*base, "--prompts", "no-such-set"], tmp_path, capsys)
