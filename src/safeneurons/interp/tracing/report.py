"""The trace's summary line and plot."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from safeneurons.analysis.plots import pyplot, save_figure
from safeneurons.interp.tracing.assignment import NEG_LOG10_CAP
from safeneurons.interp.tracing.lineage import neg_log10

if TYPE_CHECKING:
    from safeneurons.interp.tracing.lineage import TraceResult


def summary_line(result: TraceResult) -> str:
    line = (f"{result.verdict}: {result.aggregate_method} p = {result.aggregate_pvalue:.3g} (alpha {result.alpha:g}) "
            f"over {len(result.layers)} layer pair(s), {result.n_tokens} tokens, solver {result.solver}")
    if result.mode == "all-layers":
        line += f"; matched (base, other) layers: {result.matched_pairs or 'none'}"
    return line


def plot_trace(result: TraceResult, path: Path, title: str) -> None:
    """Bars of -log10(p) per layer (aligned mode) or a heat map over layer pairs (all-layers mode)."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    capped = any(m.pvalue <= 0 for m in result.layers)
    cap_note = f"; p = 0 drawn at the cap {NEG_LOG10_CAP:.0f}" if capped else ""
    if result.mode == "aligned":
        bars = axis.bar([m.layer_base for m in result.layers], [neg_log10(m.pvalue) for m in result.layers])
        for bar, match in zip(bars, result.layers):
            if match.pvalue <= 0:  # a p-value of exactly 0 has no -log10: its bar is the cap, hatched
                bar.set_hatch("//")
        if capped:  # an empty bar of the same look carries the legend entry
            axis.bar([], [], hatch="//", color=bars[0].get_facecolor(),
                     label=f"p = 0, drawn at -log10 of the smallest double ({NEG_LOG10_CAP:.0f})")
        axis.axhline(-math.log10(result.alpha), color="red", linestyle="--", label=f"alpha = {result.alpha:g}")
        axis.set_xlabel("layer")
        axis.set_ylabel("-log10 p (Spearman, gate vs up)" + cap_note)
        axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # beside the bars, never over them
    else:
        n_base = max(m.layer_base for m in result.layers) + 1
        n_other = max(m.layer_other for m in result.layers) + 1
        grid = np.zeros((n_base, n_other))
        for match in result.layers:
            grid[match.layer_base, match.layer_other] = neg_log10(match.pvalue)
        image = axis.imshow(grid, aspect="auto", origin="lower", cmap="viridis")
        figure.colorbar(image, ax=axis, label="-log10 p" + cap_note)
        axis.set_xticks(range(n_other))
        axis.set_yticks(range(n_base))
        axis.set_xlabel("layer of the other model")
        axis.set_ylabel("layer of the base model")
    axis.set_title(f"{title}: {result.verdict}", fontsize=9)
    figure.tight_layout()
    save_figure(figure, path, dpi=100)
