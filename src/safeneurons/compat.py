"""The import paths of the flat package before the sub-packages (safeneurons.scoring, safeneurons.patching, …).

Each old module is a view over the modules its code moved to: `from safeneurons.patching import ActivationPatcher`
and `safeneurons.freezing.freeze` keep working, resolved lazily on first use. New code imports from the new homes.
Old names that are now packages of their own (data, demo, finetune, masks, models) export the same view.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any, Callable, Sequence

# old module -> the new modules its names now live in, searched in this order
OLD_HOMES: dict[str, tuple[str, ...]] = {
    "ablation": ("workflows.ablation",),
    "checkpoints": ("models.loading", "runtime.checkpoints"),
    "compare": ("analysis.compare", "finetune.drift"),
    "data": ("data.examples", "data.readers", "data.samples"),
    "demo": ("demo.build", "data.demo_vocab"),
    "demo_judge": ("demo.judge",),
    "distributed": ("runtime.distributed",),
    "dsconfig": ("runtime.dsconfig",),
    "dynamic": ("interventions.dynamic",),
    "evaluate": ("evaluation.metrics", "evaluation.generation", "evaluation.evaluate", "evaluation.perplexity"),
    "finetune": ("finetune.config", "finetune.resume", "finetune.schedule", "finetune.backends", "finetune.loop", "finetune.api", "runtime.distributed"),
    "freezing": ("interventions.freezing", "masks.bits", "masks.source", "runtime.distributed", "runtime.zero3"),
    "judges": ("evaluation.judges",),
    "lora": ("finetune.lora",),
    "lowrank": ("interventions.lowrank",),
    "masks": ("masks.io",),
    "models": ("models.loading", "models.structure", "runtime.zero3"),
    "outputs": ("runtime.outputs",),
    "patching": ("interp.patching.sites", "interp.patching.metrics", "interp.patching.hooks", "interp.patching.batches", "interp.patching.patcher", "interp.patching.direction", "interp.patching.report", "runtime.distributed"),
    "pipeline": ("workflows.pipeline.settings", "workflows.pipeline.stages", "workflows.pipeline.study", "workflows.pipeline.report"),
    "plan": ("workflows.plan", "runtime.memory"),
    "prune": ("interventions.prune", "masks.apply"),
    "refusal_curve": ("evaluation.refusal_curve",),
    "rewind": ("interventions.rewind",),
    "scoring": ("scores.config", "scores.passes", "scores.statistics", "scores.selection", "scores.schedules", "scores.outputs", "interventions.analyzer", "runtime.distributed", "runtime.zero3", "runtime.memory"),
    "study": ("analysis.study",),
    "tracing": ("interp.tracing.assignment", "interp.tracing.activations", "interp.tracing.lineage", "interp.tracing.seed_api", "interp.tracing.tokens", "interp.tracing.report"),
    "trainer": ("finetune.trainer",),
    "utility": ("evaluation.utility",),
    "xstest": ("evaluation.xstest",),
}


# names that changed with the layout (one convention: `*Config` in, `*Result` out)
RENAMED = {"PipelineSettings": "PipelineConfig", "EvalReport": "EvalResult", "FineTuneReport": "FineTuneResult",
           "PruneSummary": "PruneResult", "RewindPlan": "RewindInputs", "plan_rewind": "open_inputs"}


def lazy_exports(homes: Sequence[str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for a module whose names live in `homes` (safeneurons-relative)."""
    def find(name: str) -> Any:
        name = RENAMED.get(name, name)
        for home in homes:
            module = importlib.import_module(f"safeneurons.{home}")
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"none of safeneurons.{', safeneurons.'.join(homes)} defines {name!r}")

    def names() -> list[str]:
        return sorted({name for home in homes for name in vars(importlib.import_module(f"safeneurons.{home}"))})

    return find, names


class _OldPath(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `safeneurons.<old module>` for the names in OLD_HOMES that are no longer modules."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        package, _, old = fullname.partition(".")
        if package != "safeneurons" or old not in OLD_HOMES or _is_package(old):
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = types.ModuleType(spec.name, f"Old import path; its names now live in "
                                             f"{', '.join(OLD_HOMES[spec.name.split('.', 1)[1]])}.")
        module.__getattr__, module.__dir__ = lazy_exports(OLD_HOMES[spec.name.split(".", 1)[1]])
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def _is_package(old: str) -> bool:
    return importlib.machinery.PathFinder.find_spec(f"safeneurons.{old}", sys.modules["safeneurons"].__path__) \
        is not None


def install() -> None:
    if not any(isinstance(finder, _OldPath) for finder in sys.meta_path):
        sys.meta_path.append(_OldPath())
