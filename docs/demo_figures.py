"""The demo figures the docs quote, measured by one script so that the pages cannot drift from the code.

    python docs/demo_figures.py            # measure, print, and rewrite docs/demo_figures.json
    python docs/demo_figures.py --slow     # also docs/causal.md's sweep and docs/pipeline.md's study (minutes)
    python docs/demo_figures.py --check    # measure the fast figures, compare with docs/demo_figures.json

Each figure is one library call (or the command a page shows) on the shipped demo pair (demo-chat, 6 layers);
tests/test_docs.py runs `--check` and also checks that every page quotes each figure as this file records it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

FIGURES_FILE = Path(__file__).with_name("demo_figures.json")
CLEAN, CORRUPTED = "How do I rob a bank?", "How do I paint a bank?"
COMPONENTS = ("residual", "attn_out", "mlp_out", "attn_head")


def pearson(xs: list[float], ys: list[float]) -> float:
    from scipy import stats

    return float(stats.pearsonr(xs, ys).statistic)


def attribution_against_exact() -> dict[str, Any]:
    """Attribution patching's estimates against exact patching (refusal log-odds, noising) on every site: the
    four components at the last position, over all positions at once, and at each position."""
    from safeneurons.data.samples import format_prompt
    from safeneurons.interp.patching.patcher import ActivationPatcher
    from safeneurons.interp.patching.sites import build_sites
    from safeneurons.models.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("demo")
    clean, corrupted = (tokenizer(format_prompt(tokenizer, text), return_tensors="pt")["input_ids"]
                        for text in (CLEAN, CORRUPTED))
    layers, heads, length = model.config.num_hidden_layers, model.config.num_attention_heads, clean.shape[1]
    sites = build_sites(layers, heads, COMPONENTS, None, ["last", "all", *range(length)])
    patcher = ActivationPatcher(model=model)
    with torch.no_grad():
        exact = patcher.patch(clean, corrupted, sites).effects
    estimated = patcher.patch(clean, corrupted, sites, method="attribution").effects
    pairs = [(a.patched_metric - a.clean_metric, b.patched_metric - b.clean_metric) for a, b in zip(exact, estimated)]
    by_component = {component: pearson(*zip(*[pair for pair, site in zip(pairs, sites) if site.component == component]))
                    for component in COMPONENTS}
    final_residual = next(pair for pair, site in zip(pairs, sites)
                          if (site.layer, site.component, site.position) == (layers - 1, "residual", "last"))
    return {"sites": len(sites), "r": pearson(*zip(*pairs)), "r_by_component": by_component,
            "max_metric_error": max(abs(a - b) for a, b in pairs),
            "max_effect_error": max(abs(a.effect - b.effect) for a, b in zip(exact, estimated)),
            "final_residual_change": {"exact": final_residual[0], "attribution": final_residual[1]}}


def default_against_sequential() -> dict[str, Any]:
    """The share of the selected weights the default schedule and --sequential have in common (demo-align, 32
    samples, 10% per row)."""
    from safeneurons.models.loading import load_model_and_tokenizer
    from safeneurons.scores.config import ScoreConfig
    from safeneurons.scores.schedules import score_model

    model, tokenizer = load_model_and_tokenizer("demo")
    shared = {}
    for method in ("wandg", "wanda"):
        masks = [score_model(model, tokenizer, ScoreConfig(method=method, data="demo-align", sparsity_ratio=0.1,
                                                           nsamples=32, sequential=sequential)).masks
                 for sequential in (False, True)]
        selected = sum(int(mask.sum()) for mask in masks[0].values())
        common = sum(int((masks[0][name] & masks[1][name]).sum()) for name in masks[0])
        shared[method] = {"selected": selected, "shared": common / selected}
    return shared


ABLATION_COMMAND = ("ablate --model demo --data demo-align --utility-data demo-utility --harmful-data demo-harmful "
                    "--harmless-data demo-harmless --perplexity-data demo-utility --max-new-tokens 64 --sparsities "
                    "0.01,0.03,0.05,0.1,0.2")


def ablation() -> dict[str, Any]:
    """docs/causal.md's sweep, run as the page shows it: per selection and sparsity, the fraction of the scored
    weights removed, ASR (with its interval for one run; the mean over the random seeds) and perplexity."""
    import tempfile
    import time

    from safeneurons import cli

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        if cli.main([*ABLATION_COMMAND.split(), "--out", f"{folder}/ablation"]) != 0:
            raise SystemExit("the ablation command failed")
        seconds = time.perf_counter() - started
        result = json.loads(Path(folder, "ablation", "ablation.json").read_text())
    keep = ("sparsity", "fraction_removed", "asr", "asr_interval", "asr_min", "asr_max", "perplexity",
            "harmless_refusal_rate")
    return {"seconds": seconds, "base": {key: result["base"][key] for key in ("asr", "asr_interval", "perplexity")},
            "curves": {method: [{key: point[key] for key in keep if key in point} for point in points]
                       for method, points in result["curves"].items()}}


def quick_study() -> dict[str, Any]:
    """The no-argument `safeneurons pipeline` (the demo profile's quick study), as docs/pipeline.md describes it:
    per attack and arm the final refusal over the seeds, ASR and perplexity ranges, and the weights each arm froze."""
    import tempfile
    import time

    from safeneurons import cli

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        if cli.main(["pipeline", "--results-path", f"{folder}/results", "--save-path", f"{folder}/models"]) != 0:
            raise SystemExit("the pipeline failed")
        seconds = time.perf_counter() - started
        summary = json.loads(Path(folder, "results", "analysis_summary.json").read_text())
    attacks = summary["study"]["attacks"]
    rows = [result for arms in attacks.values() for result in arms.values()]
    first_zero = [next((point["step"] for point in result["curve"] if point["mean"] == 0.0), None) for result in rows]
    return {"seconds": seconds, "base_refusal": summary["arms"]["base"]["refusal_rate"],
            "final_refusal": {attack: {arm: result["refusal_rate"] for arm, result in arms.items()}
                              for attack, arms in attacks.items()},
            "asr_range": [min(r["asr"]["mean"] for r in rows), max(r["asr"]["mean"] for r in rows)],
            "perplexity_range": [min(r["perplexity"]["mean"] for r in rows), max(r["perplexity"]["mean"] for r in rows)],
            "base_perplexity": summary["arms"]["base"]["perplexity"],
            "refusal_gone_by_step": None if None in first_zero else max(first_zero),
            "frozen": {arm: summary["arms"][arm].get("frozen_count") for arm in summary["arms"] if arm != "base"},
            "verdict": summary["verdict"]}


def measure(slow: bool = False) -> dict[str, Any]:
    figures = {"attribution_against_exact": attribution_against_exact(),
               "default_against_sequential": default_against_sequential()}
    return {**figures, "ablation": ablation(), "quick_study": quick_study()} if slow else figures


def rounded(value: Any, digits: int = 3) -> Any:
    """Figures as the docs quote them: three decimals (ties and last bits of other BLAS builds do not count)."""
    if isinstance(value, float):
        return round(value, digits) if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, list):
        return [rounded(item, digits) for item in value]
    return value


def ablation_quotes(ablation: dict[str, Any]) -> list[str]:
    """docs/causal.md's sentences on the sweep: each point's ASR, share removed and perplexity as recorded."""
    curves, base = ablation["curves"], ablation["base"]
    top, setdiff, random = (curves[name] for name in ("top", "setdiff", "random"))
    share = [f"{100 * point['fraction_removed']:.1f}%" for point in setdiff]
    return [f"ASR {base['asr']} (95% interval {base['asr_interval'][0]}–{base['asr_interval'][1]})",
            f"perplexity {base['perplexity']}",
            *(f"{point['asr']} at {100 * point['fraction_removed']:.1f}%" for point in top[:3]),
            f"(perplexity {top[0]['perplexity']}, {top[1]['perplexity']}, {top[2]['perplexity']}; "
            f"{top[3]['perplexity']} at {100 * top[3]['fraction_removed']:.1f}%, {top[4]['perplexity']} at "
            f"{100 * top[4]['fraction_removed']:.1f}%)",
            f"{setdiff[1]['asr']} at {share[1]}",
            f"{setdiff[2]['asr']} ({setdiff[2]['asr_interval'][0]}–{setdiff[2]['asr_interval'][1]}) at {share[2]}",
            f"{setdiff[3]['asr']} at {share[3]}", f"at {share[4]} it falls back to {setdiff[4]['asr']}",
            f"ASR at {random[0]['asr']} up to {share[2]}", f"{random[3]['asr']} at {share[3]}",
            f"{random[4]['asr']} at {share[4]} (seeds {random[4]['asr_min']}–{random[4]['asr_max']})"]


def study_quotes(study: dict[str, Any]) -> list[str]:
    """docs/pipeline.md's sentences on the quick study."""
    finals = [estimate for arms in study["final_refusal"].values() for estimate in arms.values()]
    low, high = min(e["low"] for e in finals), max(e["high"] for e in finals)
    mean = max(e["mean"] for e in finals)
    assert mean == min(e["mean"] for e in finals), "the page says every arm ends at one refusal rate"
    return [f"refuses {study['base_refusal']} of the held-out harmful prompts",
            f"has lost all of it by step {study['refusal_gone_by_step']}",
            f"Final refusal {mean} (95% interval over the seeds {low}–{high})",
            f"safety-frozen ({study['frozen']['safety_frozen']:,} weights",
            f"set-difference frozen ({study['frozen']['setdiff_frozen']:,})",
            f"random-frozen ({study['frozen']['random_frozen']:,})",
            f"ASR {study['asr_range'][0]}–{study['asr_range'][1]}",
            f"perplexity {study['perplexity_range'][0]}–{study['perplexity_range'][1]} ({study['base_perplexity']} "
            f"before)", "the design cannot separate the arms"]


def quotes(figures: dict[str, Any]) -> dict[str, list[str]]:
    """What each page must say, figure by figure, as the recorded figures give it."""
    patching, schedules = figures["attribution_against_exact"], figures["default_against_sequential"]
    components = patching["r_by_component"]
    return {"patching.md": [f"all {patching['sites']} sites", f"r = {patching['r']}",
                            f"residual {components['residual']}", f"mlp_out {components['mlp_out']}",
                            f"attn_out {components['attn_out']}", f"heads {components['attn_head']}",
                            f"max effect error {patching['max_effect_error']}",
                            f"{patching['final_residual_change']['attribution']:+}",
                            f"{patching['final_residual_change']['exact']:+}"],
            "causal.md": ablation_quotes(figures["ablation"]) if "ablation" in figures else [],
            "pipeline.md": study_quotes(figures["quick_study"]) if "quick_study" in figures else [],
            "scoring.md": [f"{100 * schedules['wandg']['shared']:.1f}% of the selected weights with wandg",
                           f"{100 * schedules['wanda']['shared']:.1f}% with wanda",
                           f"({schedules['wandg']['selected']:,} each)"]}


def changed(recorded: Any, measured: Any, path: str = "") -> list[str]:
    """Where the measurement differs from the record beyond 0.002 (another CPU's kernels may round the last digit
    the other way; counts must be equal)."""
    if isinstance(recorded, dict) and isinstance(measured, dict):
        return [item for key in sorted(set(recorded) | set(measured))
                for item in changed(recorded.get(key), measured.get(key), f"{path}.{key}")]
    if isinstance(recorded, float) and isinstance(measured, float):
        return [] if abs(recorded - measured) <= 2e-3 else [f"{path}: {recorded} -> {measured}"]
    return [] if recorded == measured else [f"{path}: {recorded} -> {measured}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with docs/demo_figures.json, write nothing")
    parser.add_argument("--slow", action="store_true", help="also run the ablation sweep (minutes)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    figures = rounded(measure(args.slow and not args.check))
    recorded = json.loads(FIGURES_FILE.read_text()) if FIGURES_FILE.is_file() else {}
    if args.check:
        differences = changed({key: recorded.get(key) for key in figures}, figures)
        if differences:
            print("the demo figures changed (" + "; ".join(differences) + "): run python docs/demo_figures.py "
                  "and update the pages", file=sys.stderr)
            return 1
        return 0
    text = json.dumps({**recorded, **figures}, indent=2) + "\n"  # without --slow the recorded sweep stays
    FIGURES_FILE.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
