"""Activation contrast (Chen et al. 2024's inference-time contrasting): the aligned model answers the harmful
prompts; both models then read prompt + answer, and a neuron's score is the mean |a_chat − a_base| of its
activation (the input of `down_proj`) over the answer's tokens. The answers are re-tokenised from their text."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from safeneurons.evaluation.generation import Decoding, generate
from safeneurons.models.hooks import Hooks, output_width, site_point
from safeneurons.models.structure import check_same_structure, decoder_layers, model_device
from safeneurons.runtime import distributed


def neuron_activations(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's MLP neuron activations [tokens, neurons] in one run of `ids` [1, tokens] (an MoE layer's: every
    expert's units on every token)."""
    kept: dict[int, torch.Tensor] = {}
    with Hooks() as hooks, torch.no_grad():
        for layer in range(len(decoder_layers(model))):
            hooks.on_units(model, layer, lambda values, layer=layer: kept.__setitem__(layer, values[0].float()))
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return [kept[layer] for layer in range(len(kept))]


def _contrast_sums(chat: nn.Module, base: nn.Module, tokenizer: Any, prompts: Sequence[str],
                   answers: Sequence[str]) -> tuple[list[torch.Tensor] | None, int]:
    """Σ over answer tokens of |a_chat − a_base| per [layer, neuron], and the number of answer tokens."""
    device = model_device(chat)
    total, tokens = None, 0
    for prompt, answer in zip(prompts, answers):
        prompt_length = len(tokenizer(prompt)["input_ids"])
        ids = tokenizer(prompt + answer, return_tensors="pt")["input_ids"].to(device)
        if ids.shape[1] <= prompt_length:
            continue  # an empty answer has no token to contrast
        difference = [(a - b)[prompt_length:].abs().sum(0) for a, b in
                      zip(neuron_activations(chat, ids), neuron_activations(base, ids))]  # (layers may differ in width)
        total = difference if total is None else [sum_ + part for sum_, part in zip(total, difference)]
        tokens += ids.shape[1] - prompt_length
    return total, tokens


def activation_contrast(chat: nn.Module, base: nn.Module, tokenizer: Any, prompts: Sequence[str],
                        decoding: Decoding = Decoding(max_new_tokens=64),
                        batch_size: int = 16) -> dict[int, torch.Tensor]:
    """Collective: per layer, each neuron's mean |a_chat − a_base| over the tokens `chat` generates (greedily) on
    `prompts` (already in chat format), the prompts split across ranks; every rank gets the scores."""
    check_same_structure(chat, base)
    mine = [prompts[index] for index in distributed.assign_round_robin(len(prompts))]
    answers = [texts[0] for texts in generate(chat, tokenizer, mine, decoding, batch_size)]
    parts = distributed.all_gather(_contrast_sums(chat, base, tokenizer, mine, answers))
    sums = [total for total, _ in parts if total is not None]
    tokens = sum(count for _, count in parts)
    if not sums:
        return {layer: torch.zeros(output_width(site_point(chat, layer, "mlp_neuron")))
                for layer in range(len(decoder_layers(chat)))}
    layers = len(sums[0])
    return {layer: sum(part[layer] for part in sums) / tokens for layer in range(layers)}
