"""Activation contrast (Chen et al. 2024's inference-time contrasting): the aligned model answers the harmful
prompts; both models then read prompt + answer, and a neuron's score is the mean |a_chat − a_base| of its
activation (the input of `down_proj`) over the answer's tokens. The answers are re-tokenised from their text."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from safeneurons.evaluation.generation import Decoding, generate
from safeneurons.models.hooks import Hooks, site_point
from safeneurons.models.structure import check_same_structure, decoder_layers, model_device
from safeneurons.runtime import distributed


def neuron_activations(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's MLP neuron activations [tokens, neurons] in one run of `ids` [1, tokens]."""
    kept: dict[int, torch.Tensor] = {}
    with Hooks() as hooks, torch.no_grad():
        for layer in range(len(decoder_layers(model))):
            hooks.on_input(site_point(model, layer, "mlp_neuron").module,
                           lambda _m, args, layer=layer: kept.__setitem__(layer, args[0][0].float()))
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return [kept[layer] for layer in range(len(kept))]


def _contrast_sums(chat: nn.Module, base: nn.Module, tokenizer: Any, prompts: Sequence[str],
                   answers: Sequence[str]) -> tuple[torch.Tensor, int]:
    """Σ over answer tokens of |a_chat − a_base| per [layer, neuron], and the number of answer tokens."""
    device = model_device(chat)
    total, tokens = None, 0
    for prompt, answer in zip(prompts, answers):
        prompt_length = len(tokenizer(prompt)["input_ids"])
        ids = tokenizer(prompt + answer, return_tensors="pt")["input_ids"].to(device)
        if ids.shape[1] <= prompt_length:
            continue  # an empty answer has no token to contrast
        difference = torch.stack([(a - b)[prompt_length:].abs().sum(0) for a, b in
                                  zip(neuron_activations(chat, ids), neuron_activations(base, ids))])
        total = difference if total is None else total + difference
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
        n_layers, width = len(decoder_layers(chat)), site_point(chat, 0, "mlp_neuron").module.in_features
        return {layer: torch.zeros(width) for layer in range(n_layers)}
    mean = torch.stack(sums).sum(0) / tokens
    return {layer: mean[layer] for layer in range(mean.shape[0])}
