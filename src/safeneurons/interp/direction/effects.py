"""What the selected direction does: attack success on held-out harmful prompts with the direction ablated, with
it subtracted at its layer (activation addition, −1) and in the orthogonalized weights; refusal induced on
held-out harmless prompts by adding it; KL and perplexity on harmless text; random directions of the same norm
as the control. Rates come with 95% Wilson intervals, judged by substrings: the original's JailbreakBench
prefixes by default (`judge="jailbreakbench"`), or Wei et al.'s list with its 20-word rule (`"keyword"`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import nn

from safeneurons.evaluation.generation import Decoding, generate_distributed
from safeneurons.evaluation.metrics import SUBSTRING_JUDGES, wilson_interval
from safeneurons.interp.direction import hooks
from safeneurons.interp.direction.candidates import encode, last_logits, prompt_scores
from safeneurons.interp.direction.selection import kl_divergence
from safeneurons.models.structure import model_device
from safeneurons.runtime import distributed

Intervention = Callable[[], ContextManager[Any]]


@dataclass(frozen=True)
class EffectSettings:
    decoding: Decoding
    batch_size: int
    random_directions: int  # random controls of the direction's norm (seeds 0..N-1)
    perplexity_samples: Sequence[Any] = ()  # tokenised harmless text (evaluation.perplexity.text_samples)
    judge: str = "jailbreakbench"  # a name of evaluation.metrics.SUBSTRING_JUDGES


def rate(flags: Sequence[bool]) -> dict[str, Any]:
    hits, n = sum(flags), len(flags)
    low, high = wilson_interval(hits, n)
    return {"rate": hits / n, "interval": [low, high], "n": n}


def judged(generations: Sequence[str] | None, judge: str) -> dict[str, Any] | None:
    """Rank 0: ASR and refusal rate of greedy generations by the substring judge `judge` (None elsewhere)."""
    if generations is None:
        return None
    refuses, succeeds = SUBSTRING_JUDGES[judge]
    return {"asr": rate([succeeds(text) for text in generations]),
            "refusal_rate": rate([refuses(text) for text in generations]),
            "examples": list(generations[:3])}


def generations_under(model: nn.Module, tokenizer: Any, prompts: Sequence[str], intervention: Intervention,
                      settings: EffectSettings, desc: str) -> list[str] | None:
    with intervention():
        found = generate_distributed(model, tokenizer, prompts, settings.decoding, settings.batch_size, desc=desc)
    return None if found is None else [texts[0] for texts in found]


def mean_kl(model: nn.Module, tokenizer: Any, prompts: Sequence[str], intervention: Intervention,
            batch_size: int) -> float:
    """Mean KL(baseline ‖ edited) of the last-position distributions (every rank computes all: few prompts)."""
    device = model_device(model)
    values = []
    for start in range(0, len(prompts), batch_size):
        inputs = encode(tokenizer, prompts[start:start + batch_size], device)
        base = last_logits(model, inputs)
        with intervention():
            values += kl_divergence(base, last_logits(model, inputs)).tolist()
    return float(torch.tensor(values, dtype=torch.float64).mean())


def interventions(model: nn.Module, direction: torch.Tensor, layer: int) -> dict[str, Intervention]:
    return {"baseline": contextlib.nullcontext,
            "ablation": lambda: hooks.ablation(model, direction),
            "actadd_subtract": lambda: hooks.addition(model, direction, [layer], -1.0),
            "actadd_add": lambda: hooks.addition(model, direction, [layer], 1.0)}


def direction_effects(model: nn.Module, tokenizer: Any, direction: torch.Tensor, layer: int,
                      harmful: Sequence[str], harmless: Sequence[str], settings: EffectSettings,
                      refusal: Any) -> dict[str, Any]:
    """Collective; the generations' rates on rank 0 (None elsewhere), the scores and KL on every rank."""
    edits = interventions(model, direction, layer)
    effects: dict[str, Any] = {"harmful": {}, "harmless": {}}
    for name in ("baseline", "ablation", "actadd_subtract"):
        effects["harmful"][name] = judged(generations_under(model, tokenizer, harmful, edits[name], settings,
                                                            f"harmful prompts: {name}"), settings.judge)
    for name in ("baseline", "actadd_add"):
        effects["harmless"][name] = judged(generations_under(model, tokenizer, harmless, edits[name], settings,
                                                             f"harmless prompts: {name}"), settings.judge)
    effects["kl_ablation_harmless"] = mean_kl(model, tokenizer, harmless, edits["ablation"], settings.batch_size)
    effects["refusal_score"] = {name: mean_refusal_score(model, tokenizer, prompts, edits[name], refusal,
                                                         settings.batch_size)
                                for name, prompts in (("baseline", harmful), ("ablation", harmful))}
    if settings.perplexity_samples:
        effects["perplexity"] = {name: perplexity_under(model, tokenizer, edits[name], settings)
                                 for name in ("baseline", "ablation", "actadd_subtract")}
    return effects


def perplexity_under(model: nn.Module, tokenizer: Any, intervention: Intervention, settings: EffectSettings) -> float:
    from safeneurons.evaluation.perplexity import perplexity

    with intervention():
        return perplexity(model, tokenizer, settings.perplexity_samples, settings.batch_size)


def mean_refusal_score(model: nn.Module, tokenizer: Any, prompts: Sequence[str], intervention: Intervention,
                       refusal: Any, batch_size: int) -> float:
    with intervention():
        scores = prompt_scores(model, tokenizer, prompts, lambda logits: refusal.compute(logits, None), batch_size,
                               desc="refusal scores")
    return float(torch.tensor(scores, dtype=torch.float64).mean())


def random_controls(model: nn.Module, tokenizer: Any, direction: torch.Tensor, layer: int, harmful: Sequence[str],
                    harmless: Sequence[str], settings: EffectSettings) -> list[dict[str, Any]]:
    """The same interventions with random directions of the selected one's norm (seeded)."""
    controls = []
    for seed in range(settings.random_directions):
        generator = torch.Generator().manual_seed(seed)
        vector = torch.randn(direction.shape, generator=generator, dtype=torch.float64)
        vector = (vector / vector.norm() * direction.double().norm()).float()
        edits = interventions(model, vector, layer)
        controls.append({
            "seed": seed,
            "harmful_ablation": judged(generations_under(model, tokenizer, harmful, edits["ablation"], settings,
                                                         f"random direction {seed}: ablation"), settings.judge),
            "harmless_actadd_add": judged(generations_under(model, tokenizer, harmless, edits["actadd_add"],
                                                            settings, f"random direction {seed}: addition"),
                                         settings.judge),
            "kl_ablation_harmless": mean_kl(model, tokenizer, harmless, edits["ablation"], settings.batch_size)})
    if distributed.is_main():
        return controls
    return []
