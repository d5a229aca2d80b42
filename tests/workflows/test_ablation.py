"""The ablation study: random controls with the set difference's count in every matrix, Wilson intervals against
scipy, the study end to end on the demo model (outputs, restored weights, finished points skipped), bad input."""
from __future__ import annotations

import json

import pytest
import torch

from safeneurons import cli
from safeneurons.evaluation.metrics import wilson_interval
from safeneurons.masks.apply import random_like_counts


@pytest.mark.parametrize("successes,n", [(0, 100), (4, 100), (50, 100), (100, 100), (1, 7), (12, 520)])
def test_wilson_interval_equals_scipy(successes, n):
    from scipy.stats import binomtest

    expected = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(successes, n) == pytest.approx((expected.low, expected.high), abs=1e-12)


def test_random_controls_have_the_reference_count_in_every_matrix():
    generator = torch.Generator().manual_seed(0)
    reference = {f"m{index}": torch.rand(16, 24, generator=generator) < 0.1 * (index + 1) for index in range(3)}
    first, again, other = (random_like_counts(reference, seed) for seed in (0, 0, 1))
    assert all(int(first[name].sum()) == int(mask.sum()) for name, mask in reference.items())
    assert all(torch.equal(first[name], again[name]) for name in reference)
    assert any(not torch.equal(first[name], other[name]) for name in reference)
    part = random_like_counts({"m2": reference["m2"]}, 0, names=list(reference))  # a layer-sharded rank's share
    assert torch.equal(part["m2"], first["m2"])


ARGS = ["ablate", "--model", "demo", "--data", "demo-align", "--utility-data", "demo-utility", "--nsamples", "4",
        "--harmful", "demo-harmful", "--limit", "4", "--max-new-tokens", "4", "--sparsities", "0.05,0.1"]


@pytest.mark.slow
def test_ablation_study_end_to_end_and_resume(tmp_path):
    out = tmp_path / "study"
    assert cli.main([*ARGS, "--out", str(out)]) == 0
    payload = json.loads((out / "ablation.json").read_text())
    points = {record["point"]: record for record in payload["points"]}
    assert len(points) == 1 + 2 * (1 + 1 + 3) and points["base"]["removed"] == 0
    for sparsity in ("0.05", "0.1"):
        difference = points[f"setdiff-s{sparsity}"]["removed"]
        assert difference > 0 and all(points[f"random-s{sparsity}-seed{seed}"]["removed"] == difference
                                      for seed in range(3))
        assert points[f"top-s{sparsity}"]["removed"] > 0
    assert [entry["runs"] for entry in payload["curves"]["random"]] == [3, 3]
    assert (out / "ablation.png").stat().st_size > 0 and "| random | 0.05 |" in (out / "report.md").read_text()
    assert all(0 <= r["asr_interval"][0] <= r["asr"] <= r["asr_interval"][1] <= 1 for r in points.values())
    # finished points are skipped on a re-run; a changed setting redoes them
    stamps = {path: path.stat().st_mtime_ns for path in out.glob("points/*/point.json")}
    assert cli.main([*ARGS, "--out", str(out)]) == 0
    assert {path: path.stat().st_mtime_ns for path in out.glob("points/*/point.json")} == stamps
    assert cli.main([*ARGS, "--max-new-tokens", "3", "--methods", "top", "--out", str(out)]) == 0
    assert (out / "points" / "top-s0.1" / "point.json").stat().st_mtime_ns != stamps[out / "points" / "top-s0.1" /
                                                                                        "point.json"]


def test_a_point_zeroes_exactly_its_mask_and_restores_the_weights(demo_tokenizer):
    from helpers import make_tiny_llama
    from safeneurons.workflows.ablation import zeroed

    model = make_tiny_llama(demo_tokenizer, seed=2)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    masks = {name: torch.rand(param.shape, generator=torch.Generator().manual_seed(1)) < 0.3
             for name, param in model.named_parameters() if "proj" in name}
    with zeroed(model, masks):
        for name, param in model.named_parameters():
            if name in masks:
                assert (param[masks[name]] == 0).all() and torch.equal(param[~masks[name]], before[name][~masks[name]])
    assert all(torch.equal(param, before[name]) for name, param in model.named_parameters())


@pytest.mark.parametrize("extra,message", [(["--sparsities", "0.1,1.5"], "must lie in (0, 1)"),
                                           (["--methods", "top,magnitude"], "expected a comma list"),
                                           (["--harmful", "no-such-set"], "neither a known name")])
def test_ablation_bad_input_exits_2_before_the_model_loads(tmp_path, capsys, extra, message):
    assert cli.main([*ARGS, *extra, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("holding", [[], ["--shard", "layers"]], ids=["data-parallel", "layer-sharded"])
def test_ablation_on_two_ranks_equals_one_rank(tmp_path, holding):
    """Data parallel (every rank the whole model) or layer-sharded (each rank scores, prunes and restores its own
    block; evaluation pipelined): the points of 1 rank."""
    from helpers import run_ranks

    args = [*ARGS, "--sparsities", "0.1", "--seeds", "0", "--limit", "6", "--max-new-tokens", "6"]
    assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    result = run_ranks(["safeneurons.cli", *args, *holding, "--out", str(tmp_path / "two")])
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.loads((tmp_path / run / "ablation.json").read_text())["points"] for run in ("one", "two"))
    keys = ("point", "removed", "fraction_removed", "asr", "refusal_rate")
    assert [[p[k] for k in keys] for p in one] == [[p[k] for k in keys] for p in two]
