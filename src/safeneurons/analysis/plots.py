"""Figures: matplotlib on the Agg backend (no display needed), each saved as PNG with one rename."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from safeneurons.runtime.outputs import atomic_file


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, imported on first use (most commands draw nothing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: str | Path, dpi: int = 120, **savefig: Any) -> Path:
    """Write `figure` to `path` as PNG atomically (a reader never sees half a file) and close it."""
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi, **savefig)
    pyplot().close(figure)
    return Path(path)
