"""Perplexity of a model on held-out text, response tokens only."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from safeneurons.data.examples import IGNORE_INDEX, Sample
from safeneurons.data.samples import build_samples, pad_batch
from safeneurons.errors import SafeneuronsError
from safeneurons.evaluation.generation import batch_starts
from safeneurons.runtime import distributed

if TYPE_CHECKING:
    from safeneurons.data.examples import Example


def text_samples(examples: Sequence[Example], tokenizer: Any, max_length: int, add_eos: bool = False) -> list[Sample]:
    """Token sequences to measure perplexity on: the response of prompt/response records (the prompt is
    context, not scored), or the whole text of records without a response (every token after the first)."""
    with_response = [example for example in examples if example.response is not None]
    if with_response:
        return build_samples(with_response, tokenizer, None, 0, max_length, add_eos)
    samples = []
    for example in examples:
        ids = torch.tensor(tokenizer(example.prompt, add_special_tokens=True)["input_ids"][:max_length])
        if len(ids) >= 2:
            samples.append(Sample(ids, ids.clone()))
    if not samples:
        raise SafeneuronsError("the perplexity text set has no text of at least two tokens")
    return samples


@torch.no_grad()
def negative_log_likelihood(model: nn.Module, samples: Sequence[Sample], pad_token_id: int,
                            batch_size: int = 8) -> tuple[float, int]:
    """Sum of the next-token losses over the labelled tokens of `samples`, and how many tokens that is.
    Collective under ZeRO-3 (lock-step batches, as `generate`)."""
    from safeneurons.runtime.zero3 import is_zero3_partitioned

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in distributed.progress(batch_starts(len(samples), batch_size, is_zero3_partitioned(model)),
                                      desc="perplexity", unit="batch", leave=False):
        if start is None:  # serve the other ranks' gathers
            model(input_ids=torch.tensor([[pad_token_id]], device=device), use_cache=False)
            continue
        padded = pad_batch(samples[start:start + batch_size], pad_token_id)
        batch = {key: value.to(device) for key, value in padded.items()}
        # no KV cache: a scoring pass has no use for it, and it would hold 2 × layers × kv_dim values per token
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).logits.float()
        targets = batch["labels"][:, 1:]
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((targets != IGNORE_INDEX).sum())
    return total, count


def perplexity(model: nn.Module, tokenizer: Any, samples: Sequence[Sample], batch_size: int = 8) -> float:
    """exp(mean next-token loss over all labelled tokens), with the samples split across the ranks; the same
    value on every rank."""
    mine = distributed.split_evenly(list(samples))
    totals = distributed.all_gather(negative_log_likelihood(model, mine, tokenizer.pad_token_id, batch_size))
    nll, tokens = sum(part[0] for part in totals), sum(part[1] for part in totals)
    if tokens == 0:
        raise SafeneuronsError("the perplexity text set has no tokens to score")
    return math.exp(nll / tokens)
