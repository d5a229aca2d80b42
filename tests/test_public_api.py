"""The public API stays where users found it: the seed's names, the README's paths, and every name of the flat
package's modules under its old path (each the very object that now lives in its sub-package)."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import safeneurons
from safeneurons.compat import OLD_HOMES, RENAMED

SEED_AND_README_PATHS = [
    ("safeneurons", "SafetyNeuronAnalyzer", "safeneurons.interventions.analyzer"),
    ("safeneurons", "FineTuner", "safeneurons.finetune.api"),
    ("safeneurons", "recalculate_safety_scores", "safeneurons.analysis.compare"),
    ("safeneurons", "SafeneuronsError", "safeneurons.errors"),
    ("safeneurons.patching", "ActivationPatcher", "safeneurons.interp.patching.patcher"),
    ("safeneurons.patching", "PatchingSite", "safeneurons.interp.patching.sites"),
    ("safeneurons.patching", "PatchingEffect", "safeneurons.interp.patching.sites"),
    ("safeneurons.patching", "ActivationPatchingResult", "safeneurons.interp.patching.sites"),
    *[("safeneurons.tracing", name, "safeneurons.interp.tracing.seed_api")
      for name in ("statistic", "statistic_layer", "mlp_matching_gate", "mlp_matching_up", "mlp_layers",
                   "statistic_all")],
    ("safeneurons.freezing", "freeze", "safeneurons.interventions.freezing"),
    ("safeneurons.trainer", "MaskedTrainer", "safeneurons.finetune.trainer"),
    ("safeneurons.finetune", "FineTuneConfig", "safeneurons.finetune.config"),
    ("safeneurons.finetune", "fine_tune", "safeneurons.finetune.api"),
    ("safeneurons.scoring", "ScoreConfig", "safeneurons.scores.config"),
    ("safeneurons.scoring", "score_model", "safeneurons.scores.schedules"),
    ("safeneurons.models", "load_model_and_tokenizer", "safeneurons.models.loading"),
    ("safeneurons.data", "load_samples", "safeneurons.data.samples"),
    ("safeneurons.masks", "load_masks", "safeneurons.masks.io"),
    ("safeneurons.evaluate", "evaluate_model", "safeneurons.evaluation.evaluate"),
    ("safeneurons.pipeline", "PipelineSettings", "safeneurons.workflows.pipeline.settings"),
]


@pytest.mark.parametrize("old, name, home", SEED_AND_README_PATHS)
def test_old_paths_give_the_objects_of_their_new_homes(old, name, home):
    namespace: dict = {}
    exec(f"from {old} import {name}", namespace)  # the import statement users wrote
    assert namespace[name] is getattr(importlib.import_module(home), RENAMED.get(name, name))


@pytest.mark.parametrize("old", sorted(OLD_HOMES))
def test_each_name_under_an_old_path_is_its_one_home_s_object(old):
    """No name is shadowed: what the old path gives is what the home that defines it holds."""
    module = importlib.import_module(f"safeneurons.{old}")
    homes = [importlib.import_module(f"safeneurons.{home}") for home in OLD_HOMES[old]]
    names = [name for name in dir(module) if not name.startswith("_") and name not in ("log", "annotations")]
    assert names, f"safeneurons.{old} lists no names"
    for name in names:
        defining = [home for home in homes if name in vars(home) and getattr(vars(home)[name], "__module__", home.__name__)
                    == home.__name__]
        if defining:
            assert getattr(module, name) is vars(defining[0])[name], f"safeneurons.{old}.{name}"


def test_an_unknown_name_is_an_attribute_error_naming_the_homes():
    with pytest.raises(AttributeError, match="interp.patching.patcher"):
        getattr(importlib.import_module("safeneurons.patching"), "NoSuchThing")


def test_the_package_and_the_module_entry_points():
    assert safeneurons.__version__
    for module in ("safeneurons.cli", "safeneurons.demo"):
        result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        assert "usage:" in result.stdout
