"""`pipeline --attack-rates`: the attack's strength, chosen from the plain arm alone before any other arm runs.

The rule: per attack, fine-tune plain (the study's first seed, its refusal curve measured) at each candidate
learning rate from the largest down, and keep the first rate at which plain's refusal does not halve before step
K = ceil(fraction × N) of its N steps (halving at K or later, or not at all, passes). Every arm of that attack then
trains at that rate. Too strong an attack erases refusal in one step in every arm and cannot rank anything; the
rule takes the strongest attack that still leaves a curve to compare. When no candidate passes, the smallest is
kept and the report says the rule failed.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from safeneurons.evaluation.refusal_curve import steps_until_halved
from safeneurons.runtime import distributed
from safeneurons.workflows.pipeline.stages import Run, Stage, run_stage

if TYPE_CHECKING:
    from safeneurons.workflows.pipeline.study import Study

CALIBRATION_FILE = "calibration.json"  # in the results folder: every attack's trials and chosen rate


@dataclass
class RateTrial:
    """Plain fine-tuning at one candidate rate: its steps, the step its refusal halved at (None: never)."""

    rate: float
    steps: int
    halved_at: int | None
    curve: list[dict] = field(default_factory=list)


@dataclass
class AttackStrengthResult:
    """One attack's calibration: the trials in the order run, the step limit K and the rate chosen."""

    attack: str
    trials: list[RateTrial]
    fraction: float
    chosen: float
    passed: bool  # a candidate met the rule (else the smallest is kept)

    @property
    def limit(self) -> int:
        return halving_limit(self.trials[0].steps, self.fraction)

    @property
    def chosen_halved_at(self) -> int | None:
        return next(trial.halved_at for trial in self.trials if trial.rate == self.chosen)

    def to_json(self) -> dict:
        return {**asdict(self), "limit": self.limit, "chosen_halved_at": self.chosen_halved_at}


def halving_limit(steps: int, fraction: float) -> int:
    """K: the first step at which plain's refusal may halve."""
    return max(1, math.ceil(fraction * steps))


def passes(trial: RateTrial, fraction: float) -> bool:
    return trial.halved_at is None or trial.halved_at >= halving_limit(trial.steps, fraction)


def choose_rate(trials: Sequence[RateTrial], fraction: float) -> tuple[float, bool]:
    """The first trial (largest rate first) that passes, else the smallest rate tried; whether one passed."""
    for trial in trials:
        if passes(trial, fraction):
            return trial.rate, True
    return min(trial.rate for trial in trials), False


def rule_text(fraction: float, rates: Sequence[float]) -> str:
    return (f"the largest of {', '.join(f'{rate:g}' for rate in rates)} at which plain fine-tuning (first seed) does "
            f"not halve the refusal rate before step K = ceil({fraction:g} × its steps); chosen from plain alone, "
            f"before any other arm ran, and kept for every arm")


def read_trial(folder: Path, rate: float) -> RateTrial:
    from safeneurons.finetune.config import REPORT_FILE

    report = json.loads((folder / REPORT_FILE).read_text())
    curve = report["refusal_curve"]
    return RateTrial(rate, report["steps"], steps_until_halved(curve), curve)


def calibrate_attack(study: Study, attack: str, force: bool) -> AttackStrengthResult:
    """Collective: the trials of one attack, largest rate first, until one passes (finished trials are skipped)."""
    settings = study.settings
    run = Run(attack, "plain", settings.seed_list[0])
    trials: list[RateTrial] = []
    for rate in settings.attack_rate_list:
        stage = Stage(f"calibrate_{attack}_lr{rate:g}", study.fingerprint(run, rate),
                      study.finetune(run, rate, keep_model=False))
        stage.outputs = study.outputs_of(stage.name)
        run_stage(stage, study.results, force, f"attack strength ({attack}, learning rate {rate:g})")
        trial = read_trial(study.results / stage.name, rate) if distributed.is_main() else None
        trials.append(distributed.broadcast_from_main(trial))
        if passes(trials[-1], settings.attack_halving_fraction):
            break
    chosen, passed = choose_rate(trials, settings.attack_halving_fraction)
    return AttackStrengthResult(attack, trials, settings.attack_halving_fraction, chosen, passed)


def calibrate(study: Study, force: bool = False) -> dict[str, AttackStrengthResult]:
    """Collective: every attack's rate by the rule, written to CALIBRATION_FILE (rank 0)."""
    from safeneurons.runtime.outputs import write_json

    results = {attack: calibrate_attack(study, attack, force) for attack in study.settings.attack_list}
    if distributed.is_main():
        write_json(study.results / CALIBRATION_FILE,
                   {"rule": rule_text(study.settings.attack_halving_fraction, study.settings.attack_rate_list),
                    "attacks": {attack: result.to_json() for attack, result in results.items()}})
    return results
