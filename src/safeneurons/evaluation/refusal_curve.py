"""Refusal over training: the keyword refusal rate on a fixed held-out prompt subset every K optimizer steps.

`finetune --eval-every K` measures it before the first step, after every K-th step and after the last one, with
greedy decoding and a short token budget (cheap), distributed as `eval` is (prompts split across the ranks, or
lock-step generation under ZeRO-3). The points go to `freeze_report.json` as `refusal_curve`; a resumed run keeps
the points measured before the interruption. The last point is the refusal rate `eval` gives the saved model on
the same prompts with the same decoding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from torch import nn

from safeneurons.errors import SafeneuronsError
from safeneurons.runtime import distributed

DEFAULT_PROMPTS = "advbench"
DEFAULT_LIMIT = 32
CURVE_MAX_NEW_TOKENS = 32  # short: a refusal shows in its first words, and the curve generates at every point
BATCH_SIZE = 16


@dataclass(frozen=True)
class RefusalProbe:
    """The prompts (already in the chat format), the interval, the decoding and the tokenizer of the curve."""

    prompts: Sequence[str]
    every: int
    max_new_tokens: int
    tokenizer: Any

    def due(self, step: int, total: int) -> bool:
        return step == 0 or step % self.every == 0 or step == total

    def measure(self, model: nn.Module) -> float:
        """Collective: the refusal rate of `model`'s greedy generations, on every rank."""
        from safeneurons.evaluation.generation import Decoding, generate_distributed
        from safeneurons.evaluation.metrics import refusal_rate

        was_training = model.training
        model.eval()
        try:
            generations = generate_distributed(model, self.tokenizer, self.prompts, Decoding(self.max_new_tokens),
                                               BATCH_SIZE)
        finally:
            model.train(was_training)
        rate = None if generations is None else refusal_rate([texts[0] for texts in generations])
        return distributed.broadcast_from_main(rate)


def check_probe_settings(every: int | None, limit: int, max_new_tokens: int) -> None:
    if every is not None and every < 1:
        raise SafeneuronsError(f"--eval-every {every} must be a positive number of optimizer steps")
    if limit < 1 or max_new_tokens < 1:
        raise SafeneuronsError(f"--curve-limit {limit} and --curve-max-new-tokens {max_new_tokens} must be positive")


def make_probe(every: int | None, source: str, limit: int, max_new_tokens: int, tokenizer: Any,
               directory: str | None = None) -> RefusalProbe | None:
    """The probe of `--eval-every` (None without it): the first `limit` prompts of `source`."""
    if every is None:
        return None
    from safeneurons.data.samples import load_prompts

    prompts = load_prompts(source, tokenizer, limit, directory)
    if not prompts:
        raise SafeneuronsError(f"--curve-prompts {source} holds no prompts")
    return RefusalProbe(prompts, every, max_new_tokens, tokenizer)


def steps_until_halved(curve: Sequence[dict]) -> int | None:
    """The first measured step whose refusal rate is at most half the rate before training (None if never, or
    if the curve starts without refusals)."""
    if not curve or not curve[0]["refusal_rate"]:
        return None
    half = curve[0]["refusal_rate"] / 2
    return next((point["step"] for point in curve if point["refusal_rate"] <= half), None)
