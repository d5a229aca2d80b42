"""safeneurons: find, freeze and study the safety-critical weights and neurons of large language models."""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# The original extension's public names, imported on first use so that `import safeneurons` stays light.
_LAZY = {
    "SafetyNeuronAnalyzer": "safeneurons.scoring",
    "FineTuner": "safeneurons.finetune",
    "recalculate_safety_scores": "safeneurons.compare",
}
__all__ = ["SafeneuronsError", *_LAZY]

from .errors import SafeneuronsError  # noqa: E402


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'safeneurons' has no attribute {name!r}")
