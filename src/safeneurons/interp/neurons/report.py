"""The neuron study's tables, its figure (refusal vs k with Wilson bands) and its files."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from safeneurons.interp.neurons.study import (DIRECTION_TITLES, DIRECTIONS, FIGURE_FILE, RANDOM, REPORT_FILE, percent,
                                              random_point, ranked_point, rate_text)

if TYPE_CHECKING:
    from safeneurons.interp.neurons.study import NeuronStudyResult


def table_lines(result: NeuronStudyResult) -> list[str]:
    """Markdown: per direction, the refusal rate of each ranking and of random at every k."""
    fractions = result.config["fractions"]
    lines = []
    for direction in DIRECTIONS:
        lines += ["", f"{DIRECTION_TITLES[direction].capitalize()}:", "",
                  "| ranking | " + " | ".join(f"k = {percent(k)}" for k in fractions) + " |",
                  "| --- |" + " --- |" * len(fractions)]
        for ranking in result.config["rankings"]:
            lines.append(f"| {ranking} | " + " | ".join(rate_text(ranked_point(result, direction, ranking, k))
                                                        for k in fractions) + " |")
        lines.append(f"| {RANDOM} | " + " | ".join(rate_text(random_point(result, direction, k)) for k in fractions)
                     + " |")
    return lines


def overlap_lines(result: NeuronStudyResult) -> list[str]:
    pairs = list(next(iter(result.overlaps.values())))
    return ["", "Overlap of the rankings' sets (Jaccard index; random: its first seed):", "",
            "| k | " + " | ".join(pair.replace("|", " / ") for pair in pairs) + " |", "| --- |" + " --- |" * len(pairs),
            *(f"| {percent(float(k))} | " + " | ".join(f"{values[pair]:.2f}" for pair in pairs) + " |"
              for k, values in result.overlaps.items())]


def summary_lines(result: NeuronStudyResult) -> list[str]:
    cost = result.seconds_per_prompt
    ratio = cost["patched"] / cost["plain"] if cost["plain"] else float("nan")
    return [*result.verdict, *table_lines(result), *overlap_lines(result), "",
            f"Cost: {cost['patched']:.3f} s per prompt patched vs {cost['plain']:.3f} s plain ({ratio:.1f}×; both "
            f"models run at every token)."]


def _band(axis: Any, fractions: Sequence[float], entries: Sequence[dict], label: str, style: str) -> None:
    rates = [entry["refusal_rate"] for entry in entries]
    line, = axis.plot([k * 100 for k in fractions], rates, style, label=label)
    axis.fill_between([k * 100 for k in fractions], [entry["refusal_interval"][0] for entry in entries],
                      [entry["refusal_interval"][1] for entry in entries], color=line.get_color(), alpha=0.15)


def plot_study(result: NeuronStudyResult, path: str | Path) -> Path:
    """Refusal rate vs k per ranking (Wilson bands), random pooled, the plain models as dashed lines."""
    from safeneurons.analysis.plots import pyplot, save_figure

    fractions = result.config["fractions"]
    figure, axes = pyplot().subplots(1, len(DIRECTIONS), figsize=(11, 4.2), sharey=True)
    for axis, direction in zip(axes, DIRECTIONS):
        for ranking in result.config["rankings"]:
            _band(axis, fractions, [ranked_point(result, direction, ranking, k) for k in fractions], ranking, "o-")
        _band(axis, fractions, [random_point(result, direction, k) for k in fractions],
              f"random ({len(result.config['random_seeds'])} seeds, pooled)", "k^--")
        for name, style, title in (("chat", ":", "aligned"), ("base", "-.", "base")):
            axis.axhline(result.plain[name]["refusal_rate"], linestyle=style, color="0.45",
                         label=f"plain {title} model")
        axis.set_xscale("log")
        axis.set_xticks([k * 100 for k in fractions], [percent(k) for k in fractions])
        axis.minorticks_off()
        axis.set_xlabel("neurons patched: top k% of each layer's MLP neurons")
        axis.set_title(DIRECTION_TITLES[direction].split(" (")[0], fontsize=10)
        axis.set_ylim(-0.03, 1.03)
    axes[0].set_ylabel("refusal rate on held-out harmful prompts")
    axes[-1].legend(fontsize=8, loc="best")
    figure.tight_layout()
    return save_figure(figure, path)


def write_study(result: NeuronStudyResult, out: str | Path) -> None:
    """Rank 0: neuron_patching.json and .png published together; the summary printed."""
    from safeneurons.interp.patching.run import publish_files
    from safeneurons.runtime.outputs import write_json

    publish_files(out, {REPORT_FILE: lambda path: write_json(path, result.to_json()),
                        FIGURE_FILE: lambda path: plot_study(result, path)})
    print("\n".join(summary_lines(result)))
    print(f"-> {out}/{REPORT_FILE}, {FIGURE_FILE}")
