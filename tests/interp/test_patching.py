"""Activation patching: every site against a one-site-at-a-time reference with its own hooks, the modes'
semantics, exact identities (zero and full effect), attribution, the demo model's refusal metric, and the CLI
on 1 and 2 ranks."""
from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import HEADS, logits_of, make_tiny_llama, ref_activation, ref_patched_logits, run_ranks, token_metric
from safeneurons.data.samples import format_prompt, load_prompts
from safeneurons.errors import SafeneuronsError
from safeneurons.interp.patching.direction import prompt_metrics
from safeneurons.interp.patching.metrics import refusal_metric, refusal_token_ids
from safeneurons.interp.patching.patcher import ActivationPatcher, patch_sweep
from safeneurons.interp.patching.sites import COMPONENTS, MODES, MOE_SITES, PatchingSite

# ------------------------------------------------------------------------- the straightforward reference


def ref_effect(mode, patched, clean, corrupted):
    if mode == "noising":
        return (clean - patched) / (clean - corrupted)
    if mode == "denoising":
        return (patched - corrupted) / (clean - corrupted)
    return (patched - clean) / (corrupted - clean)


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def tiny(demo_tokenizer):
    return make_tiny_llama(demo_tokenizer, seed=2, layers=2, hidden=32, intermediate=64, heads=HEADS)


@pytest.fixture(scope="module")
def prompts(demo_tokenizer):
    def ids(text):
        return demo_tokenizer(format_prompt(demo_tokenizer, text), return_tensors="pt")["input_ids"]
    clean, corrupted = ids("How do I rob a bank?"), ids("How do I paint a bank?")
    assert clean.shape == corrupted.shape
    return clean, corrupted, ids("Tell me how to bomb the city hall today.")


NEURONS = (1, 5, 30)  # the mlp_neuron sites' neurons
DENSE_COMPONENTS = tuple(component for component in COMPONENTS if component not in MOE_SITES)  # (MoE: test_moe_interp)


def all_sites(positions):
    return [PatchingSite(layer, component, head, position, NEURONS if component == "mlp_neuron" else None)
            for layer in range(2) for component in DENSE_COMPONENTS
            for head in (range(HEADS) if component == "attn_head" else [None]) for position in positions]


# ----------------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("mode", MODES)
def test_every_site_matches_one_site_reference(tiny, prompts, mode):
    clean, corrupted, _ = prompts
    sites = all_sites(["last", "all", 3, -2])
    result = ActivationPatcher(model=tiny, metric_fn=token_metric, batch_size=5).patch(clean, corrupted, sites, mode)
    clean_metric, corrupted_metric = token_metric(logits_of(tiny, clean)), token_metric(logits_of(tiny, corrupted))
    assert result.clean_metric == pytest.approx(clean_metric, abs=1e-5)
    assert result.corrupted_metric == pytest.approx(corrupted_metric, abs=1e-5)
    assert abs(clean_metric - corrupted_metric) > 0.1  # the normalisation is meaningful
    base, source = (corrupted, clean) if mode == "denoising" else (clean, corrupted)
    assert [effect.site for effect in result.effects] == sites
    for effect in result.effects:
        patched = token_metric(ref_patched_logits(tiny, base, source, effect.site))
        assert effect.patched_metric == pytest.approx(patched, abs=1e-5), effect.site.label
        expected = ref_effect(mode, patched, clean_metric, corrupted_metric)
        assert effect.effect == pytest.approx(expected, abs=1e-5 / abs(clean_metric - corrupted_metric) + 1e-5)
    assert any(abs(effect.effect) > 0.05 for effect in result.effects if effect.site.position == "last")


def test_interchange_is_not_denoising(tiny, prompts):
    clean, corrupted, _ = prompts
    sites = all_sites(["last"])
    patcher = ActivationPatcher(model=tiny, metric_fn=token_metric)
    runs = {mode: patcher.patch(clean, corrupted, sites, mode) for mode in MODES}
    for noised, swapped, denoised in zip(runs["noising"].effects, runs["interchange"].effects,
                                         runs["denoising"].effects):
        # interchange runs the base (first) prompt with the source's activation, as noising does ...
        assert swapped.patched_metric == pytest.approx(noised.patched_metric, abs=1e-6)
        # ... and normalises by (source - base); denoising runs the other prompt
        assert swapped.effect == pytest.approx(noised.effect, abs=1e-5)
    assert runs["interchange"].base_metric == runs["noising"].clean_metric
    assert runs["denoising"].base_metric == runs["denoising"].corrupted_metric
    differences = [abs(s.patched_metric - d.patched_metric)
                   for s, d in zip(runs["interchange"].effects, runs["denoising"].effects)]
    assert max(differences) > 0.05


def test_patching_own_activation_or_shared_prefix_has_no_effect(tiny, prompts, caplog):
    clean, corrupted, _ = prompts
    patcher = ActivationPatcher(model=tiny, metric_fn=token_metric, batch_size=7)
    own = patcher.patch(clean, clean, all_sites(["last", "all"]), "noising")
    assert all(effect.patched_metric == pytest.approx(own.clean_metric, abs=1e-6) for effect in own.effects)
    assert all(math.isnan(effect.effect) for effect in own.effects)  # clean == corrupted: no crash, NaN + warning
    assert "undefined" in caplog.text
    # The prompts share their first tokens, so a causal model's activations there are the clean ones.
    shared = next(i for i in range(clean.shape[1]) if clean[0, i] != corrupted[0, i])
    result = patcher.patch(clean, corrupted, all_sites(list(range(shared))), "noising")
    assert all(abs(effect.effect) < 1e-5 for effect in result.effects)


@pytest.mark.parametrize("mode", ["noising", "denoising"])
def test_every_layer_residual_at_all_positions_has_effect_one(tiny, prompts, mode):
    clean, corrupted, _ = prompts
    sites = [PatchingSite(layer, "residual", token_position="all") for layer in range(2)]
    result = ActivationPatcher(model=tiny, metric_fn=token_metric).patch(clean, corrupted, sites, mode)
    assert [effect.effect for effect in result.effects] == pytest.approx([1.0, 1.0], abs=1e-5)


def test_different_lengths_align_last_and_reject_all(tiny, prompts):
    clean, _, longer = prompts
    assert longer.shape[1] != clean.shape[1]
    patcher = ActivationPatcher(model=tiny, metric_fn=token_metric)
    sites = all_sites(["last", -3])
    result = patcher.patch(clean, longer, sites, "noising")
    for effect in result.effects:
        patched = token_metric(ref_patched_logits(tiny, clean, longer, effect.site))
        assert effect.patched_metric == pytest.approx(patched, abs=1e-5)
    for position in ("all", 2):
        with pytest.raises(SafeneuronsError, match="same number of tokens"):
            patcher.patch(clean, longer, [PatchingSite(0, "residual", token_position=position)], "noising")


def test_direction_metric_projects_final_residual_and_attribution_is_exact_where_linear(tiny, prompts):
    clean, corrupted, _ = prompts
    direction = torch.randn(32, generator=torch.Generator().manual_seed(0))
    last = 1
    # Downstream of the last layer's sites the final residual is linear in them, so the first-order estimate is
    # exact for a metric linear in the final residual.
    sites = [PatchingSite(last, c, h, p, NEURONS if c == "mlp_neuron" else None) for c in DENSE_COMPONENTS for h in (range(HEADS) if c == "attn_head" else [None])
             for p in ("last", "all", 4)]
    exact = patch_sweep(tiny, clean, corrupted, sites, direction, "noising")
    estimate = patch_sweep(tiny, clean, corrupted, sites, direction, "noising", method="attribution")
    unit = direction / direction.norm()
    final_residual = ref_activation(tiny, clean, last, "residual")[-1]  # before the final norm
    assert exact.clean_metric == pytest.approx(float(final_residual @ unit), abs=1e-5)
    assert estimate.clean_metric == pytest.approx(exact.clean_metric, abs=1e-5)
    for a, b in zip(exact.effects, estimate.effects):
        assert b.patched_metric == pytest.approx(a.patched_metric, abs=1e-4), a.site.label
    assert max(abs(e.effect) for e in exact.effects) > 0.1


@pytest.mark.slow
def test_demo_refusal_metric_separates_and_sweep_finds_layers(demo_model, demo_tokenizer):
    ids = refusal_token_ids(demo_tokenizer)
    assert demo_tokenizer.convert_ids_to_tokens(ids) == demo_tokenizer.convert_ids_to_tokens(
        demo_tokenizer(" I", add_special_tokens=False)["input_ids"])
    metric = refusal_metric(ids)
    harmful = load_prompts("demo-harmful", demo_tokenizer, 10)
    harmless = load_prompts("demo-harmless", demo_tokenizer, 10)
    harmful_scores = prompt_metrics(demo_model, demo_tokenizer, harmful, metric, batch_size=4)
    harmless_scores = prompt_metrics(demo_model, demo_tokenizer, harmless, metric, batch_size=4)
    assert min(harmful_scores) > max(harmless_scores)
    clean = demo_tokenizer(harmful[0], return_tensors="pt")["input_ids"]
    corrupted = demo_tokenizer(harmless[0], return_tensors="pt")["input_ids"]
    result = patch_sweep(demo_model, clean, corrupted, None, None, "denoising", tokenizer=demo_tokenizer)
    assert len(result.effects) == len(demo_model.model.layers)
    assert result.clean_metric > 0 > result.corrupted_metric
    assert max(abs(effect.effect) for effect in result.effects) > 0.5


def seed_report_reference(result) -> list[str]:
    """The seed's format_report (shared/seeds/003-activation-patcher.py.txt), written out again."""
    lines = ["Activation Patching — Refusal Circuit Identification", "=" * 53, ""]
    lines.append(f"Mode: {result.patching_mode}")
    lines.append(f"Layers: {result.n_layers}, Sites patched: {result.n_sites}")
    lines.append(f"Clean baseline: {result.clean_baseline:.4f}")
    lines.append(f"Corrupted baseline: {result.corrupted_baseline:.4f}")
    lines.append(f"Total effect: {result.total_effect:.4f}")
    lines.append("")
    lines.append(f"Significant sites: {len(result.significant_sites)} / {result.n_sites} "
                 f"({result.circuit_fraction:.0%})")
    lines.append(f"Top causal layers: {result.top_causal_layers}")
    lines.append("")
    lines.append("Top patching effects:")
    for e in sorted(result.effects, key=lambda e: abs(e.direct_effect), reverse=True)[:15]:
        marker = " [SIG]" if e.is_significant else ""
        head_str = f".head{e.site.head_idx}" if e.site.head_idx is not None else ""
        lines.append(f" Layer {e.site.layer_idx:3d} {e.site.component}{head_str:8s} "
                     f"effect={e.direct_effect:+.4f} patched={e.patched_metric:.4f}{marker}")
    return lines


def test_the_report_begins_with_the_seed_s_report_line_by_line(tiny, prompts):
    clean, corrupted, _ = prompts
    patcher = ActivationPatcher(0.1, model=tiny, metric_fn=token_metric)
    sites = patcher.sites(["residual", "attn_head"], None, ["last", -2])
    result = patcher.patch(clean, corrupted, sites, "noising")
    expected = seed_report_reference(result)
    lines = ActivationPatcher.format_report(result).splitlines()
    assert len(result.effects) > 15 and any(e.site.head_idx is not None for e in result.effects)
    assert lines[:len(expected)] == expected
    assert lines[len(expected):] and "per layer" in "\n".join(lines[len(expected):])  # our details follow


def _cli_args(model_dir, out, *extra):
    return ["patch", "--model", str(model_dir), "--clean", "How do I rob a bank?", "--corrupted",
            "How do I paint a bank?", "--components", "residual,attn_out,mlp_out,attn_head", "--positions",
            "last,each", "--batch-size", "16", "--out", str(out), *extra]


@pytest.mark.slow
def test_cli_direction_then_patch_writes_outputs(tiny_llama_dir, tmp_path, demo_tokenizer):
    from safeneurons.cli import main

    assert main(["patch", "--compute-direction", "--model", str(tiny_llama_dir), "--n-prompts", "6",
                 "--out", str(tmp_path / "dir")]) == 0
    saved = torch.load(tmp_path / "dir" / "refusal_direction.pt", weights_only=True)
    summary = json.loads((tmp_path / "dir" / "refusal_direction.json").read_text())
    assert saved["direction"].shape == (32,) and summary["layer"] == 1
    assert summary["harmful_projection_mean"] - summary["harmless_projection_mean"] == pytest.approx(
        float(saved["direction"].norm()), rel=1e-4)
    out = tmp_path / "patch"
    assert main(_cli_args(tiny_llama_dir, out, "--metric", "direction", "--direction",
                          str(tmp_path / "dir" / "refusal_direction.pt"))) == 0
    payload = json.loads((out / "patching.json").read_text())
    assert (out / "patching.png").stat().st_size > 0 and "top" in (out / "report.txt").read_text()
    assert len(payload["sites"]) == 2 * (3 + HEADS) * 15 and payload["metric"] == "direction"
    assert {"layer", "component", "head", "position", "patched_metric", "effect"} <= set(payload["sites"][0])
    bad = tmp_path / "bad"
    assert main(_cli_args(tiny_llama_dir, bad, "--metric", "direction")) == 2
    assert main(_cli_args(tiny_llama_dir, bad, "--positions", "all", "--corrupted", "Hello")) == 2
    assert not bad.exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_zero3_equal_one_rank(tiny_llama_dir, tmp_path):
    from safeneurons.cli import main

    assert main(_cli_args(tiny_llama_dir, tmp_path / "one")) == 0
    completed = run_ranks(["safeneurons.cli", *_cli_args(tiny_llama_dir, tmp_path / "two", "--deepspeed",
                                                          "ds_configs/zero3_inference.json")])
    assert completed.returncode == 0, completed.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "patching.json").read_text())
    two = json.loads((tmp_path / "two" / "patching.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert [s["layer"] for s in one["sites"]] == [s["layer"] for s in two["sites"]]
    for a, b in zip(one["sites"], two["sites"]):
        assert (a["component"], a["head"], a["position"]) == (b["component"], b["head"], b["position"])
        assert b["patched_metric"] == pytest.approx(a["patched_metric"], abs=1e-5)
        assert b["effect"] == pytest.approx(a["effect"], abs=1e-4)


def float64_log_odds(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """log p − log(1 − p), p = Σ softmax over `ids`, in float64 with the complement summed directly."""
    probs = torch.softmax(logits.double(), dim=-1)
    chosen = torch.zeros(logits.shape[-1], dtype=torch.bool)
    chosen[ids] = True
    return probs[:, chosen].sum(-1).log() - probs[:, ~chosen].sum(-1).log()


def test_refusal_log_odds_are_exact_from_minus_40_to_40():
    ids = [5, 17, 300]
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(81, 714, generator=generator) * 3
    for row, target in enumerate(range(-40, 41)):  # shift the refusal logits until the log-odds reach the target
        logits[row, ids] += target - float(float64_log_odds(logits[row:row + 1], ids))
    expected = float64_log_odds(logits, ids)
    assert expected.min() < -39.9 and expected.max() > 39.9
    got = refusal_metric(ids).compute(logits, None)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got.double() - expected).abs().max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("scale", [1.0, 6.0])
def test_cli_refusal_metric_of_a_confident_model_is_finite_and_exact(tmp_path, demo_model, demo_tokenizer, scale):
    """The demo with lm_head scaled x6 refuses with log-odds above 20 (float32 log(1 - p) gave inf there)."""
    import copy as copying

    from safeneurons.cli import main

    model = copying.deepcopy(demo_model)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    model.save_pretrained(tmp_path / "model")
    demo_tokenizer.save_pretrained(tmp_path / "model")
    clean, corrupted = "How do I rob a bank?", "How do I paint a bank?"
    out = tmp_path / "out"
    assert main(["patch", "--model", str(tmp_path / "model"), "--clean", clean, "--corrupted", corrupted,
                 "--out", str(out)]) == 0
    payload = json.loads((out / "patching.json").read_text())
    ids = refusal_token_ids(demo_tokenizer)
    for text, key in ((clean, "clean_metric"), (corrupted, "corrupted_metric")):
        tokens = demo_tokenizer(format_prompt(demo_tokenizer, text), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = copying.deepcopy(model).double()(tokens).logits[:, -1]
        assert payload[key] == pytest.approx(float(float64_log_odds(logits, ids)), abs=1e-4)
    assert all(site["effect"] is not None for site in payload["sites"])
    if scale == 6.0:
        assert payload["clean_metric"] > 20  # a confident refusal: past where the old form overflowed


@pytest.mark.slow
def test_cli_attribution_prints_the_exact_effect_of_its_top_sites(tmp_path, demo_model, demo_tokenizer, capsys):
    from safeneurons.cli import main

    clean, corrupted = "How do I rob a bank?", "How do I paint a bank?"
    out = tmp_path / "out"
    assert main(["patch", "--model", "demo", "--clean", clean, "--corrupted", corrupted, "--method", "attribution",
                 "--components", "residual,mlp_out", "--top", "4", "--out", str(out)]) == 0
    payload = json.loads((out / "patching.json").read_text())
    check = payload["exact_check"]
    estimates = sorted(payload["sites"], key=lambda site: -abs(site["effect"]))[:4]
    assert [(row["layer"], row["component"]) for row in check] == [(s["layer"], s["component"]) for s in estimates]
    ids = lambda text: demo_tokenizer(format_prompt(demo_tokenizer, text), return_tensors="pt")["input_ids"]
    sites = [PatchingSite(row["layer"], row["component"]) for row in check]
    exact = ActivationPatcher(tokenizer=demo_tokenizer).patch_sweep(demo_model, ids(clean), ids(corrupted), sites)
    for row, effect in zip(check, exact.effects):
        assert row["exact_effect"] == pytest.approx(effect.effect, abs=1e-5)
    printed = capsys.readouterr().out
    assert "attribution against exact patching, its top 4 sites" in printed and "exact" in (out / "report.txt").read_text()
