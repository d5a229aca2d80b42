"""`pipeline --defences`: the field's defences (docs/defences.md) as arms of the study.

The trained ones are fine-tuning arms with their options (settings.arm_options): `sppft` freezes the safety layers
located on the study's model (one `safety_layers` stage: the prune data's prompts against the utility data's),
`lisa` alternates with steps on the prune data (the safety-loss arm's data), `constrained_sft` trains with the
paper's β schedule. The post-hoc ones repair another arm's model run for run (same attack and seed) in a `defend_*`
stage: `resta` and `antidote` plain's, `safe_lora` plain LoRA's (added to the arms when not asked for). The
safety-loss arm joins them, so every defence is ranked against the package's own.

Cost: an arm's fine-tuning seconds without the refusal curve's measurements (the same for every arm), plus for a
post-hoc arm its repair, as a ratio to plain's; the one-time preparation (scoring, locating layers) apart.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from safeneurons.errors import SafeneuronsError
from safeneurons.runtime import distributed
from safeneurons.runtime.timing import Stopwatch
from safeneurons.workflows.pipeline.settings import (ARM_MASK_STAGE, NEEDS_BASE_MODEL, POST_HOC_SOURCE,
                                                     safety_layers_config)
from safeneurons.workflows.pipeline.stages import DEFENCE_FILE, Run, source_run, stage_seconds

if TYPE_CHECKING:
    from safeneurons.workflows.pipeline.settings import PipelineConfig
    from safeneurons.workflows.pipeline.study import Study

LABELS = {"sppft": "SPPFT (safety layers frozen)", "safe_lora": "Safe LoRA", "lisa": "Lisa",
          "constrained_sft": "constrained SFT (Qi et al.)", "antidote": "Antidote", "resta": "RESTA"}


def check_defence_inputs(s: PipelineConfig) -> None:
    """Before anything loads: the base model holds --model's tensors (file headers), Antidote has harmful data,
    Lisa trains under no DeepSpeed stage but 3."""
    from safeneurons.models.loading import open_matching_checkpoints
    from safeneurons.runtime.dsconfig import read_config, zero_stage

    if any(name in NEEDS_BASE_MODEL for name in s.defence_list):
        open_matching_checkpoints({"--model": s.model, "--base-model": s.base_model}, s.cache_dir)
    if "antidote" in s.defence_list and not s.harmful_training_data:
        raise SafeneuronsError("--defences antidote re-aligns on harmful prompts with harmful answers: give "
                               "--harmful-training-data")
    if "lisa" in s.defence_list and s.deepspeed and zero_stage(read_config(s.deepspeed)) != 3:
        raise SafeneuronsError(f"--defences lisa adds its proximal gradient to ZeRO-3's partitions or the plain "
                               f"loop's gradients: --deepspeed {s.deepspeed} is ZeRO stage "
                               f"{zero_stage(read_config(s.deepspeed))}")


def safety_layers_stage(study: Study) -> Callable[[Path], None]:
    def work(folder: Path) -> None:
        from safeneurons.interp.safety_layers import run_safety_layers

        run_safety_layers(safety_layers_config(study.settings), folder)

    return work


def repair_config(study: Study, run: Run):
    """The defend command's config for a post-hoc arm's run: its source run's model against --model."""
    from safeneurons.interventions.antidote import AntidoteConfig
    from safeneurons.interventions.safe_lora import SafeLoraConfig
    from safeneurons.interventions.task_arithmetic import RestaConfig

    s, finetuned = study.settings, study.model_of(source_run(run))
    if run.arm == "resta":
        return RestaConfig(finetuned, s.model, s.base_model, seed=run.seed, cache_dir=s.cache_dir)
    if run.arm == "safe_lora":
        return SafeLoraConfig(finetuned, s.model, s.base_model, cache_dir=s.cache_dir)
    return AntidoteConfig(finetuned, s.harmful_training_data, nsamples=s.nsamples, max_length=s.max_length,
                          batch_size=s.score_batch_size, seed=s.seed, data_dir=s.data_dir, dtype=s.dtype,
                          cache_dir=s.cache_dir)


def defend_stage(study: Study, run: Run) -> Callable[[Path], None]:
    def work(folder: Path) -> None:
        from safeneurons.interventions.antidote import run_antidote
        from safeneurons.interventions.safe_lora import run_safe_lora
        from safeneurons.interventions.task_arithmetic import run_resta
        from safeneurons.runtime.outputs import write_json

        config = repair_config(study, run)
        started = Stopwatch()
        result = {"resta": run_resta, "safe_lora": run_safe_lora, "antidote": run_antidote}[run.arm](
            config, study.model_of(run))
        if distributed.is_main():
            write_json(folder / DEFENCE_FILE, {"method": run.arm, "source": study.model_of(source_run(run)),
                                               "seconds": round(started.seconds(), 3),
                                               "cpu_seconds": round(started.cpu_seconds(), 3),
                                               "summary": result.to_json(config)})

    return work


def training_seconds(results: Path, run: Run) -> float | None:
    """A fine-tuning's CPU seconds (rank 0) without its refusal curve's measurements."""
    from safeneurons.finetune.config import REPORT_FILE

    path = results / f"finetune_{run.key}" / REPORT_FILE
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    return report["cpu_seconds"] - report.get("refusal_curve_cpu_seconds", 0.0)


def run_seconds(study: Study, run: Run) -> float | None:
    """What one run of the arm costs: its fine-tuning, or its source's fine-tuning plus the repair."""
    if run.arm not in POST_HOC_SOURCE:
        return training_seconds(study.results, run)
    source = training_seconds(study.results, source_run(run))
    repair = json.loads((study.results / f"defend_{run.key}" / DEFENCE_FILE).read_text())["cpu_seconds"]
    return None if source is None else source + repair


def preparation_seconds(study: Study, arm: str) -> float | None:
    """The one-time stage an arm needs before its runs (scoring its mask, locating layers), if any."""
    stage = ARM_MASK_STAGE.get(arm)
    return None if stage is None else stage_seconds(study.results / stage)


def arm_costs(study: Study) -> dict[str, dict[str, dict]]:
    """Per attack and fine-tuned arm: mean seconds per run over the seeds, the ratio to plain's, the one-time
    preparation."""
    costs = {}
    for attack in study.settings.attack_list:
        means = {}
        for arm in study.arms[1:]:
            seconds = [run_seconds(study, Run(attack, arm, seed)) for seed in study.settings.seed_list]
            means[arm] = sum(seconds) / len(seconds) if None not in seconds else None
        plain = means.get("plain")
        costs[attack] = {arm: {"seconds": mean, "relative_to_plain": mean / plain if mean and plain else None,
                               "preparation_seconds": preparation_seconds(study, arm)}
                         for arm, mean in means.items()}
    return costs


def cost_lines(costs: dict[str, dict[str, dict]], labels: dict[str, str]) -> list[str]:
    """The report's cost table."""
    def number(value: float | None, digits: int = 1) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    lines = ["", "## Cost of each arm", "",
             "CPU seconds per run (rank 0's process CPU time, mean over the seeds; other load on the machine "
             "stretches wall-clock time but barely moves CPU time): fine-tuning without the refusal curve's "
             "measurements, plus the repair for a post-hoc defence (whose fine-tuning is its source arm's); the ratio "
             "to plain fine-tuning; the one-time preparation shared by the seeds and attacks (scoring a mask, "
             "locating the safety layers).",
             "", "| attack | arm | CPU seconds per run | × plain | one-time preparation (CPU s) |",
             "| --- | --- | --- | --- | --- |"]
    for attack, arms in costs.items():
        lines += [f"| {attack} | {labels.get(arm, arm)} | {number(cost['seconds'])} | "
                  f"{number(cost['relative_to_plain'], 2)} | {number(cost['preparation_seconds'])} |"
                  for arm, cost in arms.items()]
    return lines
