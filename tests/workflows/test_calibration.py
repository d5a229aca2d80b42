"""The attack-strength rule (workflows/pipeline/calibration.py) on canned refusal curves."""
from __future__ import annotations

import math

from safeneurons.workflows.pipeline.calibration import RateTrial, choose_rate, halving_limit, passes


def _trial(rate: float, rates_by_step: list[float]) -> RateTrial:
    """Plain at `rate`, refusal measured after every step (step 0 before training)."""
    half = rates_by_step[0] / 2
    halved = next((step for step, value in enumerate(rates_by_step) if value <= half), None)
    return RateTrial(rate, len(rates_by_step) - 1, halved)


def test_the_largest_rate_whose_refusal_does_not_halve_before_step_k_is_chosen():
    fast = _trial(1e-3, [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # halves at step 1
    edge = _trial(3e-4, [1.0, 0.9, 0.6, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0])  # at step 3
    slow = _trial(1e-4, [1.0, 1.0, 1.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.6])  # never
    assert halving_limit(8, 0.25) == 2 == math.ceil(0.25 * 8) and halving_limit(3, 0.1) == 1
    assert [passes(trial, 0.25) for trial in (fast, edge, slow)] == [False, True, True]
    assert choose_rate([fast, edge, slow], 0.25) == (3e-4, True)
    assert choose_rate([fast, edge, slow], 0.5) == (1e-4, True)  # K = 4: only "never" passes
    assert not passes(edge, 0.5) and passes(_trial(1.0, [1.0, 0.8, 0.8, 0.8, 0.5]), 1.0)  # halving at K passes
    assert choose_rate([fast], 0.25) == (1e-3, False)  # none passes: the smallest tried, and the rule says so
    assert choose_rate([fast, _trial(1e-4, [1.0, 0.5, 0.0, 0.0])], 0.5) == (1e-4, False)
