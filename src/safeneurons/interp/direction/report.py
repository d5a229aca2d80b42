"""The selection's scores as a figure (score vs the candidate's layer, one line per position, as the original
plots them) and the stage's summary in a few lines."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from safeneurons.analysis.plots import pyplot, save_figure
from safeneurons.interp.direction.selection import CandidateScore

PANELS = (("refusal_score", "Ablating the direction on harmful prompts", "refusal score (bypass)"),
          ("steering_score", "Adding the direction on harmless prompts", "refusal score (induce)"),
          ("kl_div_score", "KL when ablating on harmless prompts", "KL(baseline ‖ ablated)"))


def plot_scores(scores: Sequence[CandidateScore], tokens: Sequence[str], effects: Mapping[str, Any],
                path: str | Path) -> Path:
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    positions = sorted({score.position for score in scores})
    baselines = {"refusal_score": effects.get("refusal_score", {}).get("baseline"), "kl_div_score": 0.0}
    for axis, (key, title, label) in zip(axes, PANELS):
        for position in positions:
            rows = sorted((score for score in scores if score.position == position), key=lambda score: score.layer)
            axis.plot([row.layer for row in rows], [getattr(row, key) for row in rows], marker=".",
                      label=f"{position}: {tokens[position]!r}")
        if baselines.get(key) is not None:
            axis.axhline(baselines[key], color="black", linestyle="--", linewidth=1, label="baseline")
        selected = [score for score in scores if score.discarded is None]
        best = min(selected, key=lambda score: score.refusal_score) if selected else None
        if best is not None:
            axis.scatter([best.layer], [getattr(best, key)], color="red", zorder=3, label="selected")
        axis.set_title(title)
        axis.set_xlabel("layer of the candidate (decoder block input, resid_pre)")
        axis.set_ylabel(label)
    axes[0].legend(title="position", fontsize=7)
    figure.tight_layout()
    return save_figure(figure, path)


def rate_text(entry: Mapping[str, Any] | None, key: str, with_n: bool = True) -> str:
    """A judged rate as "0.88 [0.72, 0.95] (n=32)"; "–" where it was not measured."""
    if not entry:
        return "–"
    value = entry[key]
    return (f"{value['rate']:.2f} [{value['interval'][0]:.2f}, {value['interval'][1]:.2f}]"
            + (f" (n={value['n']})" if with_n else ""))


JUDGE_NAMES = {"jailbreakbench": "the original's (JailbreakBench refusal prefixes, any case, no length rule)",
               "keyword": "Wei et al.'s refusal substrings, and an attack needs >= 20 words"}


def selection_note(report: Mapping[str, Any]) -> str:
    """How the candidate was chosen, where the original's filter did not choose it."""
    chosen_by = report.get("selected_by", "filter")
    if chosen_by == "filter":
        return ""
    bound = report["selection"].get("fallback_kl_threshold")
    rule = (f"the lowest bypass with KL <= {bound:g}" if chosen_by == "kl_bounded" else "the lowest bypass of all")
    return f" (the filter discarded every candidate, this one for {report['selected']['discarded']}: {rule})"


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    best, effects = report["selected"], report["effects"]
    harmful, harmless = effects["harmful"], effects["harmless"]
    lines = [f"refusal direction: position {best['position']} ({report['post_instruction_tokens'][best['position']]!r}),"
             f" layer {best['layer']}; bypass {best['refusal_score']:.3f}, induce {best['steering_score']:.3f}, "
             f"KL {best['kl_div_score']:.4f}" + selection_note(report),
             f"ASR on held-out harmful prompts: baseline {rate_text(harmful['baseline'], 'asr')}, ablation "
             f"{rate_text(harmful['ablation'], 'asr')}, subtraction {rate_text(harmful['actadd_subtract'], 'asr')}",
             f"refusal on held-out harmless prompts: baseline {rate_text(harmless['baseline'], 'refusal_rate')}, "
             f"addition {rate_text(harmless['actadd_add'], 'refusal_rate')}"]
    if effects.get("perplexity"):
        lines.append("perplexity on harmless text: " + ", ".join(f"{name} {value:.3f}"
                                                                 for name, value in effects["perplexity"].items())
                     + (f", orthogonalized {report['orthogonalized']['perplexity']:.3f}"
                        if "perplexity" in report.get("orthogonalized", {}) else ""))
    orthogonalized = report.get("orthogonalized", {})
    if orthogonalized.get("measured"):
        lines.append(f"orthogonalized weights: ASR {rate_text(orthogonalized['harmful'], 'asr')}")
    lines += [f"warning: {warning}" for warning in report.get("warnings", [])]
    lines.append(f"judge: {JUDGE_NAMES[report.get('judge', 'keyword')]}")
    for control in effects.get("random_directions", []):
        lines.append(f"random direction {control['seed']}: ablation ASR "
                     f"{rate_text(control['harmful_ablation'], 'asr')}, addition refusal "
                     f"{rate_text(control['harmless_actadd_add'], 'refusal_rate')}")
    return lines
