"""Patching metrics: refusal log-odds, logit difference, projection on a direction."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from safeneurons.errors import SafeneuronsError
from safeneurons.interp.patching.direction import load_direction
from safeneurons.interp.patching.sites import FINAL_RESIDUAL, REFUSAL_STARTS


@dataclass(frozen=True)
class Metric:
    """Maps the last-position logits [B, vocab] and final residual [B, hidden] of B runs to B values."""

    name: str
    compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    detail: dict[str, Any] = field(default_factory=dict)  # what the metric measures, for patching.json


def refusal_metric(token_ids: Sequence[int]) -> Metric:
    """Log-odds of the refusal tokens at the last position, log p − log(1 − p) with p = Σ p(refusal token),
    computed as logsumexp(refusal logits) − logsumexp(other logits): exact in float32 at any confidence (the
    direct form loses precision past log-odds ≈ 10 and overflows to inf past ≈ 18)."""
    ids = torch.tensor(sorted(set(token_ids)), dtype=torch.long)

    def compute(logits: torch.Tensor, _residual: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        chosen = ids.to(logits.device)
        others = logits.index_fill(-1, chosen, -math.inf)
        return torch.logsumexp(logits[:, chosen], dim=-1) - torch.logsumexp(others, dim=-1)

    return Metric("refusal", compute, {"refusal_token_ids": ids.tolist()})


def logit_diff_metric(token_a: int, token_b: int) -> Metric:
    def compute(logits: torch.Tensor, _residual: torch.Tensor) -> torch.Tensor:
        return logits[:, token_a].float() - logits[:, token_b].float()

    return Metric("logit_diff", compute, {"token_ids": [token_a, token_b]})


def direction_metric(direction: torch.Tensor) -> Metric:
    """Projection of the final residual (the last decoder layer's output, before the final norm) on a unit direction."""
    unit = direction.detach().float().flatten()
    unit = unit / unit.norm()

    def compute(_logits: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if residual.shape[-1] != unit.numel():
            raise SafeneuronsError(f"the refusal direction has {unit.numel()} entries; the model's hidden size is "
                                   f"{residual.shape[-1]}")
        return residual.float() @ unit.to(residual.device)

    return Metric("direction", compute, {"residual": FINAL_RESIDUAL})


def metric_from_fn(metric_fn: Callable[[torch.Tensor], Any], name: str = "custom") -> Metric:
    """A user metric: last-position logits of one run, shape [1, vocab] -> float (a torch scalar for attribution)."""
    def compute(logits: torch.Tensor, _residual: torch.Tensor) -> torch.Tensor:
        values = [torch.as_tensor(metric_fn(logits[row:row + 1]), dtype=torch.float32).reshape(())
                  for row in range(logits.shape[0])]
        return torch.stack(values)

    return Metric(name, compute)


def refusal_token_ids(tokenizer: Any, starts: Sequence[str] = REFUSAL_STARTS) -> list[int]:
    """The first response token of each refusal start, tokenized in context after a templated prompt and the chat
    format's response separator, as the samples a model is aligned on are built (`data.samples.response_text`):
    Llama-2 and the demo answer `▁I`, a ChatML model `I` after its newline."""
    from safeneurons.data.samples import format_prompt, response_text

    prompt = format_prompt(tokenizer, "Hello")
    prompt_ids = tokenizer(prompt)["input_ids"]
    found: list[int] = []
    for start in starts:
        ids = tokenizer(prompt + response_text(tokenizer, start))["input_ids"]
        shared = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(prompt_ids), len(ids)))
        if shared >= len(ids):
            raise SafeneuronsError(f"refusal start {start!r} adds no token after the prompt")
        if ids[shared] not in found:
            found.append(ids[shared])
    return found


def metric_named(name: str, tokenizer: Any, tokens: Sequence[str] | None = None, direction: str | None = None,
                 refusal_starts: Sequence[str] = REFUSAL_STARTS) -> Metric:
    """The metric `--metric NAME` asks for: logit_diff of two one-token texts, the projection on a refusal
    direction file, or the refusal log-odds of the refusal starts' first tokens."""
    if name == "logit_diff":
        return logit_diff_metric(token_id(tokenizer, tokens[0]), token_id(tokenizer, tokens[1]))
    if name == "direction":
        return direction_metric(load_direction(direction))
    return refusal_metric(refusal_token_ids(tokenizer, refusal_starts))


def token_id(tokenizer: Any, text: str) -> int:
    """The single token of `text` (for --tokens " I" " Sure")."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise SafeneuronsError(f"--tokens {text!r} is {len(ids)} tokens {pieces}; give texts that are one token each")
    return ids[0]
