"""The freezing study over seeds: per attack and arm, the mean and 95% interval of every outcome, the refusal
curves, "steps until refusal halves", and a verdict that says when arms cannot be told apart.

Intervals are Student-t intervals of the mean over the seeds (each seed orders the fine-tuning data): with n seeds,
mean ± t(0.975, n − 1) · sd / √n, clipped to the metric's range (rates in [0, 1], perplexity ≥ 1); a single seed
has no interval. Two arms are *distinguishable* on a metric when
their intervals do not overlap.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

from safeneurons.analysis.plots import pyplot, save_figure
from safeneurons.evaluation.refusal_curve import steps_until_halved

METRICS = ("refusal_rate", "asr", "harmless_refusal_rate", "perplexity")
METRIC_LABELS = {"refusal_rate": "final refusal (harmful)", "asr": "ASR", "harmless_refusal_rate":
                 "refusal (harmless)", "perplexity": "perplexity", "steps_until_halved": "steps until refusal halves"}


@dataclass(frozen=True)
class Estimate:
    """The mean over seeds and its 95% t-interval (None with one seed or none)."""

    mean: float | None
    low: float | None
    high: float | None
    n: int

    def overlaps(self, other: "Estimate") -> bool:
        if None in (self.low, self.high, other.low, other.high):
            return True  # without intervals nothing can be told apart
        return self.low <= other.high and other.low <= self.high


# The range each metric can take: its interval is clipped there (a rate's t-interval can reach past 1 when the
# seeds' values sit at the edge, a perplexity's below 1).
METRIC_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "refusal_rate": (0.0, 1.0), "asr": (0.0, 1.0), "harmless_refusal_rate": (0.0, 1.0), "perplexity": (1.0, None),
    "steps_until_halved": (0.0, None)}


def estimate(values: Sequence[float | None],
             bounds: tuple[float | None, float | None] = (None, None)) -> Estimate:
    """The mean and the 95% Student-t interval of the mean over the seeds, clipped to `bounds` (low, high)."""
    from scipy import stats

    present = [float(value) for value in values if value is not None]
    n = len(present)
    if n == 0:
        return Estimate(None, None, None, 0)
    mean = sum(present) / n
    if n == 1:
        return Estimate(mean, None, None, 1)
    if len(set(present)) == 1:  # no spread: scipy's interval would be NaN (0/0)
        low = high = mean
    else:
        low, high = (float(end) for end in stats.t.interval(0.95, n - 1, loc=mean, scale=stats.sem(present)))
    floor, ceiling = bounds
    low = low if floor is None else max(floor, low)
    high = high if ceiling is None else min(ceiling, high)
    return Estimate(mean, low, high, n)


def mean_curve(curves: Sequence[Sequence[dict]]) -> list[dict]:
    """Per measured step (the steps every seed measured): the mean refusal rate and its 95% interval."""
    steps = sorted(set.intersection(*(set(point["step"] for point in curve) for curve in curves))) if curves else []
    by_step = [{point["step"]: point["refusal_rate"] for point in curve} for curve in curves]
    return [{"step": step, **asdict(estimate([rates[step] for rates in by_step], METRIC_BOUNDS["refusal_rate"]))}
            for step in steps]


def aggregate_arm(rows: Sequence[Mapping]) -> dict:
    """One arm under one attack: per-seed rows (eval results, refusal curve) → estimates, curve, halving steps."""
    halved = [steps_until_halved(row.get("refusal_curve") or []) for row in rows]
    curves = [row["refusal_curve"] for row in rows if row.get("refusal_curve")]
    return {**{metric: asdict(estimate([row.get(metric) for row in rows], METRIC_BOUNDS[metric])) for metric in METRICS},
            "steps_until_halved": asdict(estimate([step for step in halved if step is not None],
                                                  METRIC_BOUNDS["steps_until_halved"])),
            "halved_in": sum(step is not None for step in halved), "seeds": len(rows),
            "per_seed": {metric: [row.get(metric) for row in rows] for metric in METRICS},
            "per_seed_steps_until_halved": halved, "curve": mean_curve(curves)}


def _interval_text(value: Mapping | None, digits: int = 2) -> str:
    if not value or value["mean"] is None:
        return "–"
    if value["low"] is None:
        return f"{value['mean']:.{digits}f}"
    return f"{value['mean']:.{digits}f} ({value['low']:.{digits}f}–{value['high']:.{digits}f})"


def table_rows(attacks: Mapping[str, Mapping[str, dict]], labels: Mapping[str, str]) -> list[list[str]]:
    """Per attack and arm: final refusal, ASR, harmless refusal, perplexity and the halving steps (mean, 95% CI)."""
    rows = []
    for attack, arms in attacks.items():
        for arm, result in arms.items():
            halved = result["steps_until_halved"]
            never = result["seeds"] - result["halved_in"]
            if halved["n"]:
                steps = _interval_text(halved, 1) + (f"; not in {never} of {result['seeds']}" if never else "")
            else:  # no curve at all: a post-hoc repair, or none measured
                steps = "not within the run" if result["curve"] else "–"
            rows.append([attack, labels.get(arm, arm), *(_interval_text(result[metric], 3 if metric == "perplexity"
                                                                        else 2) for metric in METRICS), steps])
    return rows


TABLE_HEADER = ["attack", "arm", *(METRIC_LABELS[metric] for metric in METRICS), METRIC_LABELS["steps_until_halved"]]


SATURATED_WITHIN = 0.05  # a curve within this of a rate's bound counts as saturated there


def saturation(arms: Mapping[str, dict]) -> str | None:
    """The sentence saying that every arm's refusal curve already sat at one bound (0 or 1) at its first measurement
    after step 0 and stayed there — when the design measured too late (or the attack was too strong or too weak)
    to separate the arms; None otherwise."""
    curves = [result["curve"] for result in arms.values()]
    if not curves or any(len(curve) < 2 for curve in curves):
        return None
    first = [curve[1]["mean"] for curve in curves]
    for bound in (0.0, 1.0):
        if all(abs(point["mean"] - bound) <= SATURATED_WITHIN for curve in curves for point in curve[1:]):
            return (f"Every arm's refusal was already {bound:.0f} at the first measurement after training started "
                    f"(step {curves[0][1]['step']}; rates {min(first):.2f}–{max(first):.2f}) and stayed there, so the "
                    f"design cannot separate the arms: measure earlier (--eval-every) or make the attack "
                    f"{'weaker' if bound == 0 else 'stronger'}.")
    return None


def ranking(final: Mapping[str, Estimate], labels: Mapping[str, str]) -> str:
    """The arms ranked by their mean final refusal, which of them the first cannot be told from (overlapping
    intervals), and each arm's standing against plain."""
    ranked = sorted((arm for arm in final if final[arm].mean is not None), key=lambda arm: -final[arm].mean)
    if len(ranked) < 2:
        return ""
    name = {arm: labels.get(arm, arm) for arm in ranked}
    text = "Ranked by final refusal: " + ", ".join(f"{place}. {name[arm]} {final[arm].mean:.2f}"
                                                   for place, arm in enumerate(ranked, 1)) + "."
    first = ranked[0]
    if any(final[arm].low is None for arm in ranked):
        return text + " Some arms have no interval (one seed): the ranking cannot tell arms apart."
    tied = [name[arm] for arm in ranked[1:] if final[arm].overlaps(final[first])]
    text += (f" Not distinguishable from {name[first]} (intervals overlap): {', '.join(tied)}." if tied else
             f" {name[first]} is distinguishable from every other arm.")
    if "plain" in final and first != "plain":
        plain = final["plain"]
        above = [name[arm] for arm in ranked if arm != "plain" and not final[arm].overlaps(plain)
                 and final[arm].mean > plain.mean]
        below = [name[arm] for arm in ranked if arm != "plain" and not final[arm].overlaps(plain)
                 and final[arm].mean < plain.mean]
        text += f" Above plain: {', '.join(above) or 'none'}; below plain: {', '.join(below) or 'none'}."
    return text


def verdict(attacks: Mapping[str, Mapping[str, dict]], base: Mapping, labels: Mapping[str, str] | None = None) -> str:
    """Per attack, one sentence on the final refusal rate of the frozen arms against plain and the random control,
    quoting the intervals and saying plainly when the arms are not distinguishable or the curves saturated."""
    labels = labels or {}
    sentences = [f"Base model refusal on the harmful prompts: {base['refusal_rate']:.2f}."]
    for attack, arms in attacks.items():
        if "plain" not in arms:
            continue
        final = {arm: Estimate(**result["refusal_rate"]) for arm, result in arms.items()}
        seeds = arms["plain"]["seeds"]
        parts = [f"{labels.get(arm, arm)} {_interval_text(arms[arm]['refusal_rate'])}" for arm in arms]
        text = f"Under the {attack} attack ({seeds} seed{'s' if seeds != 1 else ''}; mean and 95% interval): " \
               + ", ".join(parts) + "."
        saturated = saturation(arms)
        if saturated:
            text += " " + saturated
        plain = final["plain"]
        if plain.mean is not None and base["refusal_rate"] - plain.mean < 0.05:
            sentences.append(text + " Plain fine-tuning did not lower refusal, so this attack cannot show "
                                    "whether freezing helps.")
            continue
        findings = []
        for arm in ("safety_frozen", "setdiff_frozen"):
            if arm not in final:
                continue
            name = labels.get(arm, arm)
            if final[arm].overlaps(plain):
                findings.append(f"{name} is not distinguishable from plain")
            elif final[arm].mean > plain.mean:
                findings.append(f"{name} keeps more refusal than plain")
            else:
                findings.append(f"{name} keeps less refusal than plain")
            control = final.get("random_frozen")
            if control is not None:
                findings.append(f"{name} is {'not ' if final[arm].overlaps(control) else ''}distinguishable from "
                                f"the random control")
        text += " " + "; ".join(findings).capitalize() + "." if findings else ""
        sentences.append((text + " " + ranking(final, labels)).rstrip())
    return " ".join(sentences)


CURVE_COLUMNS = 5  # panels per row: a study with the defences has a dozen arms


def plot_curves(attacks: Mapping[str, Mapping[str, dict]], labels: Mapping[str, str], path: Path) -> Path:
    """curves.png: refusal rate against fine-tuning step, one block of panels per attack and one panel per arm
    that has a curve (arms that coincide would hide each other on one axis; a post-hoc repair has none): the arm's
    mean over seeds with its 95% band, and plain's mean dashed for reference."""
    plt = pyplot()
    arm_names = list(dict.fromkeys(arm for arms in attacks.values() for arm, row in arms.items() if row.get("curve")))
    arm_names = arm_names or ["plain"]
    columns = min(len(arm_names), CURVE_COLUMNS)
    block = math.ceil(len(arm_names) / columns)  # rows per attack
    rows = max(len(attacks), 1) * block
    height = 2.6 * rows + 1.0  # inches: the panels and a strip at the bottom for the x label and the legend
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, height), squeeze=False,
                                sharex=True, sharey=True)
    for number, (attack, arms) in enumerate(attacks.items()):
        panels = axes[number * block:(number + 1) * block].flat
        reference = arms.get("plain", {}).get("curve") or []
        for index, axis in enumerate(panels):
            if index >= len(arm_names):
                axis.set_visible(False)
                continue
            arm = arm_names[index]
            curve = arms.get(arm, {}).get("curve") or []
            if reference and arm != "plain":
                axis.plot([p["step"] for p in reference], [p["mean"] for p in reference], color="grey",
                          linestyle="--", linewidth=1, label="plain (mean)")
            if curve:
                steps = [point["step"] for point in curve]
                axis.plot(steps, [point["mean"] for point in curve], marker=".", color="C0", label="mean over seeds")
                if all(point["low"] is not None for point in curve):
                    axis.fill_between(steps, [point["low"] for point in curve], [point["high"] for point in curve],
                                      color="C0", alpha=0.2, label="95% interval")
            else:
                axis.text(0.5, 0.5, "no refusal curve measured", transform=axis.transAxes, ha="center",
                          va="center", fontsize=7)
            axis.set_title(f"{attack}: {labels.get(arm, arm)}", fontsize=8)
            axis.set_ylim(-0.02, 1.02)
            axis.tick_params(labelbottom=True, labelsize=7)
    figure.supxlabel("optimizer step", y=0.45 / height, fontsize=9)
    figure.supylabel("refusal rate (held-out harmful prompts)", x=0.005, fontsize=9)
    handles = {name: handle for axis in axes.flat for handle, name in zip(*axis.get_legend_handles_labels())}
    if handles:
        figure.legend(list(handles.values()), list(handles), loc="lower center", bbox_to_anchor=(0.5, 0.0),
                      ncol=len(handles), fontsize=8)
    figure.suptitle("refusal during fine-tuning, per attack and arm (post-hoc repairs have no curve)")
    figure.tight_layout(rect=(0.015, 0.65 / height, 1, 1))
    save_figure(figure, path, dpi=120)
    return path
