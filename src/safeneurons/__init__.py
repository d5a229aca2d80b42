"""safeneurons: find, freeze and study the safety-critical weights and neurons of large language models.

The sub-packages follow the data path, each importing only from those before it:
runtime → models, data → masks → scores → interventions → evaluation → finetune → interp, analysis, demo →
workflows → cli (tests/test_layout.py keeps it so).
"""
from __future__ import annotations

import importlib
from typing import Any

from safeneurons import compat
from safeneurons.errors import SafeneuronsError

__version__ = "0.1.0"

# The original extension's public names, imported on first use so that `import safeneurons` stays light.
_LAZY = {
    "SafetyNeuronAnalyzer": "safeneurons.interventions.analyzer",
    "FineTuner": "safeneurons.finetune.api",
    "recalculate_safety_scores": "safeneurons.analysis.compare",
}
__all__ = ["SafeneuronsError", *_LAZY]

compat.install()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'safeneurons' has no attribute {name!r}")
