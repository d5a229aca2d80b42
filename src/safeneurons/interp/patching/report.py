"""The seed's text report, the heat map and the attribution check."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from safeneurons.analysis.plots import pyplot, save_figure
from safeneurons.interp.patching.sites import COMPONENTS

if TYPE_CHECKING:
    from safeneurons.interp.patching.sites import ActivationPatchingResult, PatchingSite, Position


def _position_label(position: Position, token_labels: Sequence[str] | None) -> str:
    if isinstance(position, int) and token_labels and -len(token_labels) <= position < len(token_labels):
        return f"{position} {token_labels[position]!r}"
    return str(position)


def _column_label(site: PatchingSite, token_labels: Sequence[str] | None, several_positions: bool) -> str:
    position = _position_label(site.position, token_labels)
    if site.head is None:
        return position
    return f"h{site.head}@{position}" if several_positions else f"h{site.head}"


def _format_effect(value: float) -> str:
    return f"{value:+.3f}" if math.isfinite(value) else "nan"


SEED_TITLE = "Activation Patching — Refusal Circuit Identification"
SEED_TOP = 15  # the seed's report lists its 15 strongest sites


def seed_report(result: ActivationPatchingResult) -> list[str]:
    """The seed's report, line for line (scripts parse it): title, mode, sizes, baselines, total effect, the
    significant sites, the top causal layers and the 15 strongest effects."""
    lines = [SEED_TITLE, "=" * 53, "", f"Mode: {result.patching_mode}",
             f"Layers: {result.n_layers}, Sites patched: {result.n_sites}",
             f"Clean baseline: {result.clean_baseline:.4f}", f"Corrupted baseline: {result.corrupted_baseline:.4f}",
             f"Total effect: {result.total_effect:.4f}", "",
             f"Significant sites: {len(result.significant_sites)} / {result.n_sites} ({result.circuit_fraction:.0%})",
             f"Top causal layers: {result.top_causal_layers}", ""]
    if result.effects:
        lines.append("Top patching effects:")
        for effect in sorted(result.effects, key=lambda e: abs(e.direct_effect), reverse=True)[:SEED_TOP]:
            head = f".head{effect.site.head_idx}" if effect.site.head_idx is not None else ""
            lines.append(f" Layer {effect.site.layer_idx:3d} {effect.site.component}{head:8s} "
                         f"effect={effect.direct_effect:+.4f} patched={effect.patched_metric:.4f}"
                         f"{' [SIG]' if effect.is_significant else ''}")
    return lines


def format_report(result: ActivationPatchingResult, top: int = 10, token_labels: Sequence[str] | None = None) -> str:
    """The seed's report, then ours: baselines with their lengths, the largest |effect| of each layer and
    component, and the `top` sites with their positions."""
    base, source = ("base", "source") if result.mode == "interchange" else ("clean", "corrupted")
    lines = [*seed_report(result), "",
             f"Activation patching: mode {result.mode}, method {result.method}, metric {result.metric}",
             f"  {base} metric {result.clean_metric:.4f} ({result.clean_length} tokens), "
             f"{source} metric {result.corrupted_metric:.4f} ({result.corrupted_length} tokens)",
             f"  {len(result.effects)} sites; effect 1 = the site alone carries the whole difference, 0 = none",
             f"  significant sites (|effect| > {result.significance_threshold:g}): {len(result.significant_sites)} of "
             f"{result.n_sites} ({result.circuit_fraction:.0%}); top causal layers: {result.top_causal_layers}", ""]
    components = [c for c in COMPONENTS if any(e.site.component == c for e in result.effects)]
    layers = sorted({effect.site.layer for effect in result.effects})
    lines.append("largest |effect| per layer: " + "  ".join(f"{c:>10}" for c in components))
    for layer in layers:
        cells = []
        for component in components:
            values = [e.effect for e in result.effects if e.site.layer == layer and e.site.component == component
                      and math.isfinite(e.effect)]
            cells.append(f"{_format_effect(max(values, key=abs)) if values else '-':>10}")
        lines.append(f"  layer {layer:>3}{'':>17}" + "  ".join(cells))
    lines += ["", f"top {min(top, len(result.effects))} sites by |effect|:"]
    for effect in result.top(top):
        site = effect.site
        head = f" head {site.head}" if site.head is not None else ""
        lines.append(f"  layer {site.layer:>3} {site.component:<9}{head} position "
                     f"{_position_label(site.position, token_labels)}: effect {_format_effect(effect.effect)} "
                     f"(patched metric {effect.patched_metric:.4f}){' [SIG]' if effect.is_significant else ''}")
    return "\n".join(lines)


def plot_heatmap(result: ActivationPatchingResult, path: str | Path,
                 token_labels: Sequence[str] | None = None) -> None:
    """One panel per component: layers × positions (or × heads for attn_head), colour = effect."""
    plt = pyplot()
    components = [c for c in COMPONENTS if any(e.site.component == c for e in result.effects)]
    several_positions = len({effect.site.position for effect in result.effects}) > 1
    layers = sorted({effect.site.layer for effect in result.effects})
    finite = [abs(e.effect) for e in result.effects if math.isfinite(e.effect)]
    scale = max(finite, default=1.0) or 1.0
    width = max(4.0, 2.5 + 0.35 * len(result.effects) / len(layers))
    figure, axes = plt.subplots(1, len(components), squeeze=False, figsize=(width, 1.5 + 0.35 * len(layers)))
    for axis, component in zip(axes[0], components):
        effects = [effect for effect in result.effects if effect.site.component == component]
        columns = list(dict.fromkeys(_column_label(e.site, token_labels, several_positions) for e in effects))
        grid = torch.full((len(layers), len(columns)), math.nan)
        for effect in effects:
            column = columns.index(_column_label(effect.site, token_labels, several_positions))
            grid[layers.index(effect.site.layer), column] = effect.effect
        image = axis.imshow(grid.numpy(), cmap="RdBu_r", vmin=-scale, vmax=scale, aspect="auto", origin="lower")
        axis.set_title(component)
        axis.set_xticks(range(len(columns)), columns, rotation=90, fontsize=7)
        axis.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        axis.set_ylabel("layer")
        axis.set_xlabel("head" if component == "attn_head" and not several_positions else
                        "head @ token position" if component == "attn_head" else "token position")
    figure.colorbar(image, ax=axes[0].tolist(), label=f"effect ({result.mode}, {result.metric})")
    figure.suptitle(f"Activation patching: {result.mode}, {result.method}")
    save_figure(figure, path, dpi=120, bbox_inches="tight")


def format_attribution_check(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["", f"attribution against exact patching, its top {len(rows)} sites:"]
    for row in rows:
        head = f" head {row['head']}" if row["head"] is not None else ""
        guess, truth = (_format_effect(math.nan if v is None else v)
                        for v in (row["attribution_effect"], row["exact_effect"]))
        lines.append(f"  layer {row['layer']:>3} {row['component']:<9}{head} position {row['position']}: "
                     f"attribution {guess}, exact {truth}")
    return "\n".join(lines)
