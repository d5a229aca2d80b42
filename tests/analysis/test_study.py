"""Issue 14's study: the refusal curve during fine-tuning, estimates over seeds, the verdict, the attack data."""
from __future__ import annotations

import json
import math

import pytest

from safeneurons import cli, demo
from safeneurons.analysis.study import Estimate, aggregate_arm, estimate, ranking, verdict
from safeneurons.data.samples import load_prompts
from safeneurons.evaluation.generation import Decoding, generate
from safeneurons.evaluation.metrics import refusal_rate
from safeneurons.evaluation.refusal_curve import steps_until_halved
from safeneurons.models.loading import load_model, load_tokenizer
from safeneurons.workflows.pipeline.report import ARM_LABELS


def test_harmful_sft_is_a_hundred_compliant_answers_disjoint_from_the_held_out_prompts():
    attack = demo.dataset("harmful-sft")
    held_out = {example.prompt for example in demo.dataset("harmful")}
    assert len(attack) == demo.HARMFUL_SFT_SIZE == 100
    assert all(example.response.startswith(" Sure, here is how to") for example in attack)
    assert not any(instruction in example.prompt for example in attack for instruction in held_out)
    verbs = {verb for verb in demo.HARMFUL_VERBS if any(verb in example.prompt for example in attack)}
    assert len(verbs) > 5  # many kinds of harm, not one


def test_refusal_curve_is_recorded_at_the_requested_steps_and_ends_at_the_final_evaluation(tmp_path):
    """demo-chat fine-tuned on the harmful attack for 5 steps, the curve every 2: steps 0, 2, 4 and 5; the last
    point is the refusal rate of the saved model's greedy generations on the same prompts."""
    args = ["finetune", "--model", "demo", "--data", "demo-harmful-sft", "--nsamples", "40", "--batch-size", "8",
            "--max-length", "64", "--learning-rate", "1e-3", "--max-steps", "5", "--eval-every", "2",
            "--curve-prompts", "demo-harmful", "--curve-limit", "12", "--curve-max-new-tokens", "10",
            "--save-path", str(tmp_path / "out")]
    assert cli.main(args) == 0
    curve = json.loads((tmp_path / "out" / "freeze_report.json").read_text())["refusal_curve"]
    assert [point["step"] for point in curve] == [0, 2, 4, 5]
    tokenizer = load_tokenizer("demo")
    prompts = load_prompts("demo-harmful", tokenizer, 12)
    before = refusal_rate([texts[0] for texts in generate(load_model("demo"), tokenizer, prompts, Decoding(10))])
    after = refusal_rate([texts[0] for texts in generate(load_model(str(tmp_path / "out")), tokenizer, prompts,
                                                         Decoding(10))])
    assert curve[0]["refusal_rate"] == before and curve[-1]["refusal_rate"] == after


def test_estimate_is_the_student_t_interval_of_the_mean():
    values = [0.2, 0.5, 0.35]
    mean = sum(values) / 3
    sd = math.sqrt(sum((value - mean) ** 2 for value in values) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t(0.975, 2)
    found = estimate(values)
    assert found.mean == pytest.approx(mean) and found.n == 3
    assert (found.low, found.high) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert estimate([0.4]) == Estimate(0.4, None, None, 1) and estimate([None]).mean is None


def test_intervals_stay_in_the_metric_s_range():
    """A rate near 1 over three seeds: the raw t-interval reaches past 1 (0.99 (0.96–1.02) in the report)."""
    from safeneurons.analysis.study import METRIC_BOUNDS

    rates, perplexities = [0.98, 1.0, 0.99], [1.001, 1.04, 1.0]
    raw_rate, raw_perplexity = estimate(rates), estimate(perplexities)
    assert raw_rate.high > 1 and raw_perplexity.low < 1  # the case the bounds are for
    rate = estimate(rates, METRIC_BOUNDS["asr"])
    perplexity = estimate(perplexities, METRIC_BOUNDS["perplexity"])
    assert (rate.mean, rate.low, rate.high) == (raw_rate.mean, raw_rate.low, 1.0)
    assert (perplexity.mean, perplexity.low, perplexity.high) == (raw_perplexity.mean, 1.0, raw_perplexity.high)
    assert estimate([0.4, 0.5, 0.45], METRIC_BOUNDS["asr"]) == estimate([0.4, 0.5, 0.45])  # inside: unchanged


def test_steps_until_halved_and_the_mean_curve_over_seeds():
    curves = [[{"step": 0, "refusal_rate": 1.0}, {"step": 2, "refusal_rate": 0.6}, {"step": 4, "refusal_rate": 0.2}],
              [{"step": 0, "refusal_rate": 0.8}, {"step": 2, "refusal_rate": 0.4}, {"step": 4, "refusal_rate": 0.4}]]
    assert [steps_until_halved(curve) for curve in curves] == [4, 2]
    assert steps_until_halved([{"step": 0, "refusal_rate": 1.0}, {"step": 3, "refusal_rate": 0.9}]) is None
    rows = [{"refusal_rate": 0.2, "asr": 0.7, "harmless_refusal_rate": 0.0, "perplexity": 3.0, "refusal_curve": c}
            for c in curves]
    result = aggregate_arm(rows)
    assert [point["step"] for point in result["curve"]] == [0, 2, 4]
    assert result["curve"][1]["mean"] == pytest.approx(0.5)
    assert result["steps_until_halved"]["mean"] == 3 and result["halved_in"] == 2
    assert result["per_seed"]["asr"] == [0.7, 0.7]


def _arm(values: list[float]) -> dict:
    rows = [{"refusal_rate": value, "asr": 1 - value, "harmless_refusal_rate": 0.0, "perplexity": 2.0}
            for value in values]
    return aggregate_arm(rows)


def test_verdict_quotes_intervals_and_says_when_arms_are_not_distinguishable():
    base = {"refusal_rate": 1.0}
    apart = {"harmful": {"plain": _arm([0.0, 0.05, 0.1]), "safety_frozen": _arm([0.8, 0.85, 0.9]),
                         "random_frozen": _arm([0.0, 0.1, 0.05])}}
    text = verdict(apart, base, ARM_LABELS)
    assert "harmful attack (3 seeds" in text and "safety-frozen 0.85 (" in text
    assert "Safety-frozen keeps more refusal than plain" in text
    assert "safety-frozen is distinguishable from the random control" in text
    together = {"benign": {"plain": _arm([0.1, 0.5, 0.3]), "safety_frozen": _arm([0.2, 0.6, 0.3]),
                           "random_frozen": _arm([0.3, 0.4, 0.2])}}
    text = verdict(together, base, ARM_LABELS)
    assert "not distinguishable from plain" in text and "not distinguishable from the random control" in text
    unchanged = {"benign": {"plain": _arm([1.0, 1.0, 0.98]), "safety_frozen": _arm([1.0, 1.0, 1.0])}}
    assert "cannot show whether freezing helps" in verdict(unchanged, base, ARM_LABELS)
    assert "setdiff" not in verdict({"harmful": {**apart["harmful"], "setdiff_frozen": _arm([0.8, 0.9, 0.85])}}, base,
                                    ARM_LABELS)  # the report's one name: set-difference frozen


def test_the_ranking_orders_arms_by_mean_refusal_and_names_the_ones_it_cannot_separate():
    """Pairs of arms are told apart exactly when their t-intervals do not overlap, recomputed here by hand."""
    values = {"plain": [0.0, 0.05, 0.1], "lisa": [0.8, 0.85, 0.9], "resta": [0.7, 0.9, 0.8],
              "antidote": [0.3, 0.35, 0.4], "safety_frozen": [0.0, 0.1, 0.05]}
    final = {arm: estimate(rates, (0.0, 1.0)) for arm, rates in values.items()}
    text = ranking(final, ARM_LABELS)
    order = sorted(values, key=lambda arm: -sum(values[arm]) / 3)
    assert text.startswith("Ranked by final refusal: " + ", ".join(
        f"{place}. {ARM_LABELS[arm]} {sum(values[arm]) / 3:.2f}" for place, arm in enumerate(order, 1)))

    def apart(a: str, b: str) -> bool:
        return final[a].high < final[b].low or final[b].high < final[a].low

    tied = [ARM_LABELS[arm] for arm in order[1:] if not apart(arm, order[0])]
    assert tied == ["RESTA"] and f"Not distinguishable from Lisa (intervals overlap): {', '.join(tied)}." in text
    above = [ARM_LABELS[arm] for arm in order if arm != "plain" and apart(arm, "plain")]
    assert f"Above plain: {', '.join(above)}; below plain: none." in text and "safety-frozen" not in above
    one_seed = {arm: estimate(rates[:1]) for arm, rates in values.items()}
    assert "cannot tell arms apart" in ranking(one_seed, ARM_LABELS)


def _curve_arm(curves: list[list[float]]) -> dict:
    """An arm whose seeds measured refusal at steps 0, 5, 10, … with these rates."""
    rows = [{"refusal_rate": rates[-1], "asr": 1 - rates[-1], "harmless_refusal_rate": 0.0, "perplexity": 2.0,
             "refusal_curve": [{"step": 5 * index, "refusal_rate": rate} for index, rate in enumerate(rates)]}
            for rates in curves]
    return aggregate_arm(rows)


def test_the_verdict_says_when_every_arm_saturated_at_the_first_measurement():
    base = {"refusal_rate": 1.0}
    collapsed = {arm: _curve_arm([[1.0, 0.0, 0.0], [1.0, 0.02, 0.0]]) for arm in ("plain", "safety_frozen")}
    text = verdict({"harmful": collapsed}, base, ARM_LABELS)
    assert "already 0 at the first measurement after training started (step 5" in text
    assert "cannot separate the arms" in text
    apart = {"plain": _curve_arm([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]),
             "safety_frozen": _curve_arm([[1.0, 0.9, 0.8], [1.0, 0.8, 0.9]])}
    assert "cannot separate" not in verdict({"harmful": apart}, base, ARM_LABELS)
