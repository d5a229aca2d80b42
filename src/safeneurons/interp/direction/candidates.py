"""Candidate directions: the mean of harmful minus harmless activations at every decoder layer's input
(resid_pre) and every post-instruction position, and the refusal scores that filter the prompts first.

Prompts go in fixed batches (the batches split across ranks); each prompt's activations are gathered in prompt
order and summed in float64 in that order on every rank: the candidates do not depend on the number of ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from safeneurons.errors import SafeneuronsError
from safeneurons.models.hooks import Hooks
from safeneurons.models.structure import decoder_layers, model_device
from safeneurons.runtime.distributed import map_fixed_batches


def encode(tokenizer: Any, prompts: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Left-padded ids, mask and positions (counting real tokens only, as generation does)."""
    encoded = tokenizer(list(prompts), padding=True, padding_side="left", return_tensors="pt")
    mask = encoded["attention_mask"]
    return {"input_ids": encoded["input_ids"].to(device), "attention_mask": mask.to(device),
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).to(device)}


def last_logits(model: nn.Module, inputs: dict[str, torch.Tensor], copies: int = 1) -> torch.Tensor:
    """[copies × B, vocab]: the last position's logits of the batch repeated `copies` times (one copy per candidate
    direction the hooks edit)."""
    repeated = {key: value.repeat(copies, 1) for key, value in inputs.items()}
    with torch.no_grad():
        return model(**repeated, use_cache=False, logits_to_keep=1).logits[:, -1].float()


def batched(n_items: int, batch_size: int, run: Callable[[list[int]], list[Any]], desc: str) -> list[Any]:
    """`run` over fixed batches, split across ranks, results in item order on every rank (the same at any rank
    count: a prompt's activations depend on its batch's padding)."""
    return map_fixed_batches(n_items, batch_size, run, desc)


def prompt_scores(model: nn.Module, tokenizer: Any, prompts: Sequence[str], score: Callable[[torch.Tensor], torch.Tensor],
                  batch_size: int, desc: str) -> list[float]:
    """`score(last-position logits)` of each prompt's own run."""
    device = model_device(model)

    def run(indices: list[int]) -> list[float]:
        return score(last_logits(model, encode(tokenizer, [prompts[i] for i in indices], device))).tolist()

    return batched(len(prompts), batch_size, run, desc)


def resid_pre(model: nn.Module, tokenizer: Any, prompts: Sequence[str], n_positions: int,
              batch_size: int) -> list[torch.Tensor]:
    """Per prompt, [positions, layers, hidden] (float32): every block's input at the last `n_positions` tokens."""
    device, layers = model_device(model), decoder_layers(model)

    def run(indices: list[int]) -> list[torch.Tensor]:
        captured: list[torch.Tensor] = [None] * len(layers)  # type: ignore[list-item]
        with Hooks() as hooks:
            for index, block in enumerate(layers):
                def keep(_module: nn.Module, args: tuple, kwargs: dict, index: int = index) -> None:
                    hidden = args[0] if args else kwargs["hidden_states"]
                    captured[index] = hidden[:, -n_positions:].detach().float().cpu()
                hooks.on_input(block, keep, with_kwargs=True)
            last_logits(model, encode(tokenizer, [prompts[i] for i in indices], device))
        stacked = torch.stack(captured, dim=2)  # [B, positions, layers, hidden]
        return list(stacked)

    return batched(len(prompts), batch_size, run, desc="activations")


def mean_activations(activations: Sequence[torch.Tensor]) -> torch.Tensor:
    """The float64 mean over prompts, summed in prompt order."""
    if not activations:
        raise SafeneuronsError("a mean over no prompt")
    total = torch.zeros(activations[0].shape, dtype=torch.float64)
    for activation in activations:
        total += activation.double()
    return total / len(activations)


@dataclass
class Candidates:
    """harmful − harmless mean activations, [positions, layers, hidden] in float64; position −P..−1."""

    directions: torch.Tensor
    token_ids: list[int]  # the post-instruction tokens, in order
    n_harmful: int
    n_harmless: int

    @property
    def positions(self) -> list[int]:
        return list(range(-len(self.token_ids), 0))

    def at(self, position: int, layer: int) -> torch.Tensor:
        return self.directions[position, layer]


def compute_candidates(model: nn.Module, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str],
                       token_ids: Sequence[int], batch_size: int) -> Candidates:
    n = len(token_ids)
    harmful_mean = mean_activations(resid_pre(model, tokenizer, harmful, n, batch_size))
    harmless_mean = mean_activations(resid_pre(model, tokenizer, harmless, n, batch_size))
    directions = harmful_mean - harmless_mean
    if bool(directions.isnan().any()):
        raise SafeneuronsError("the candidate directions hold NaN: the model's activations are not finite")
    return Candidates(directions, list(token_ids), len(harmful), len(harmless))
