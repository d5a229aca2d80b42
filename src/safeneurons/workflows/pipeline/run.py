"""The study from start to end: its stages in order (the Study's own and those of the stage modules: calibration,
the defences, the direction, the neuron study), then the report. The rooms' one-way order: settings → stages →
study → calibration, defences, direction, circuit, neurons → report → run."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import torch

from safeneurons.runtime import distributed
from safeneurons.runtime.tracking import TrackingConfig, open_tracker
from safeneurons.workflows.pipeline import circuit, direction, neurons
from safeneurons.workflows.pipeline.calibration import calibrate
from safeneurons.workflows.pipeline.defences import check_defence_inputs, defend_stage, safety_layers_stage
from safeneurons.workflows.pipeline.report import write_final_outputs
from safeneurons.workflows.pipeline.settings import (POST_HOC_SOURCE, PipelineConfig, check_inputs,
                                                     safety_layers_config)
from safeneurons.workflows.pipeline.stages import SAFETY_LAYERS_STAGE, Run, Stage, run_stages
from safeneurons.workflows.pipeline.study import TRACKING_DIR, Study, log


def training_stage(study: Study, run: Run) -> Stage:
    """A run's fine-tuning, or for a post-hoc defence the repair of its source run's model."""
    if run.arm not in POST_HOC_SOURCE:
        return Stage(f"finetune_{run.key}", study.fingerprint(run), study.finetune(run))
    return Stage(f"defend_{run.key}", study.fingerprint(run), defend_stage(study, run))


def study_stages(study: Study) -> list[Stage]:
    s = asdict(study.settings)
    scoring, setdiff = study.scoring_fingerprint(), study.setdiff_fingerprint()
    evaluation = {key: s[key] for key in ("harmful_data", "eval_limit", "harmless_data", "perplexity_data",
                                          "perplexity_samples", "max_new_tokens", "seed", "max_length", "judge",
                                          "judge_model")}
    trained = study.fingerprint
    stages = [Stage("score", scoring, study.score(study.settings.model, study.settings.prune_method))]
    if "setdiff_frozen" in study.arms:
        stages.append(Stage("score_setdiff", setdiff, study.score(study.settings.model, study.settings.prune_method,
                                                                  set_difference=True)))
    if study.settings.random_control:
        stages.append(Stage("score_random", {**scoring, "method": "random"},
                            study.score(study.settings.model, "random")))
    if "sppft" in study.arms:
        stages.append(Stage(SAFETY_LAYERS_STAGE, asdict(safety_layers_config(study.settings)),
                            safety_layers_stage(study)))
    stages += [training_stage(study, run) for run in study.runs if run.arm not in POST_HOC_SOURCE]
    stages += [training_stage(study, run) for run in study.runs if run.arm in POST_HOC_SOURCE]
    reference = trained(study.reference_run("safety_frozen"))
    stages.append(Stage("rescore", reference, study.score(study.model_of(study.reference_run("safety_frozen")),
                                                          study.settings.prune_method)))
    stages.append(Stage("compare", {**reference, "arms": study.arms}, study.compare))
    stages.append(Stage("eval_base", {**scoring, **evaluation}, study.evaluate(None)))
    stages += [Stage(f"eval_{run.key}", {**trained(run), **evaluation}, study.evaluate(run)) for run in study.runs]
    if study.settings.direction:
        stages.append(Stage(direction.STAGE, {**scoring, **evaluation}, direction.direction_stage(study)))
    if study.settings.circuit:
        stages.append(Stage(circuit.STAGE, {**scoring, **evaluation}, circuit.circuit_stage(study)))
    if study.settings.neuron_patching:
        options = {key: s[key] for key in ("neuron_base_model", "neuron_fractions", "neuron_random_seeds",
                                           "utility_data", "setdiff_p", "score_batch_size")}
        stages.append(Stage(neurons.STAGE, {**scoring, **evaluation, **options}, neurons.neuron_stage(study)))
    for stage in stages:
        stage.outputs = study.outputs_of(stage.name)
    return stages


def choose_device(settings: PipelineConfig, context: distributed.DistContext) -> torch.device:
    if context.world_size > 1 or not settings.device.startswith("cuda"):
        return context.device if context.world_size > 1 else torch.device(settings.device)
    if not torch.cuda.is_available():
        log.warning("--device %s asked for but CUDA is not available: running on the CPU", settings.device)
        return torch.device("cpu")
    return torch.device(settings.device)


def run_study(settings: PipelineConfig, force: bool = False) -> dict | None:
    """Every stage in order (skipping finished ones), then the summary files; the summary on rank 0."""
    context = distributed.init_distributed()
    study = Study(settings, choose_device(settings, context))
    if settings.attack_rate_list:
        study.calibration = calibrate(study, force)
        study.rates = {attack: result.chosen for attack, result in study.calibration.items()}
    run_stages(study_stages(study), study.results, force)
    if not distributed.is_main():
        return None
    summary = write_final_outputs(study)
    track_results(settings, study.results, summary)
    return summary


def track_results(settings: PipelineConfig, results: Path, summary: Mapping[str, Any]) -> None:
    """The study's final numbers per arm (refusal, ASR, perplexity, …) as one tracked run beside the fine-tunes'."""
    tracker = open_tracker(TrackingConfig(settings.report_to, str(results / TRACKING_DIR / "study"), "study",
                                          results.name), asdict(settings))
    tracker.log({f"study/{arm}/{key}": value for arm, row in summary["arms"].items() for key, value in row.items()
                 if isinstance(value, (int, float)) and not isinstance(value, bool)}, 0)
    tracker.close()


def run_pipeline(settings: PipelineConfig, force: bool = False) -> dict | None:
    """The whole study after its inputs are checked (collective); the summary on rank 0."""
    check_inputs(settings)
    check_defence_inputs(settings)
    return run_study(settings, force)
