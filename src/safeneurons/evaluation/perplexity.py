"""Perplexity of a model on held-out text, response tokens only."""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from safeneurons.data.examples import IGNORE_INDEX, Sample
from safeneurons.data.samples import build_samples, pad_batch
from safeneurons.errors import SafeneuronsError
from safeneurons.evaluation.generation import batch_starts
from safeneurons.models.blocks import block_of
from safeneurons.runtime import distributed

if TYPE_CHECKING:
    from safeneurons.data.examples import Example
    from safeneurons.models.blocks import LayerBlock


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
        batch = _padded(samples[start:start + batch_size], pad_token_id, device)
        # no KV cache: a scoring pass has no use for it, and it would hold 2 × layers × kv_dim values per token
        loss, tokens = _summed_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                          use_cache=False).logits, batch["labels"])
        total, count = total + loss, count + tokens
    return total, count


@torch.no_grad()
def pipelined_negative_log_likelihood(block: LayerBlock, samples: Sequence[Sample], pad_token_id: int,
                                      batch_size: int = 8) -> tuple[float, int]:
    """`negative_log_likelihood` on a layer-sharded model: the batches flow through the stages, the last sums
    the losses (0 and 0 on the other stages)."""
    link = block.link()
    total, count = 0.0, 0
    try:
        for start in distributed.progress(range(0, len(samples), batch_size), desc="perplexity", unit="batch",
                                          leave=False):
            batch = _padded(samples[start:start + batch_size], pad_token_id, block.device)
            received = block.receive(link, batch["input_ids"].shape)
            run = functools.partial(block.run, batch["input_ids"], received, attention_mask=batch["attention_mask"],
                                    use_cache=False)
            if not block.last:
                link.send_activation(run())
                continue
            loss, tokens = _summed_loss(run(), batch["labels"])  # the logits held by the loss alone: freed early
            total, count = total + loss, count + tokens
    finally:
        link.finish()
    return total, count


def _padded(samples: Sequence[Sample], pad_token_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in pad_batch(samples, pad_token_id).items()}


def _summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """The summed next-token loss over the labelled tokens, and their count. The caller passes the logits without
    keeping them: their fp32 copy replaces them here."""
    logits, targets = logits.float(), labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum").item()
    return loss, int((targets != IGNORE_INDEX).sum())


def perplexity(model: nn.Module, tokenizer: Any, samples: Sequence[Sample], batch_size: int = 8) -> float:
    """exp(mean next-token loss over all labelled tokens), with the samples split across the ranks (on a
    layer-sharded model: across its replicas, each pipelining its share); the same value on every rank."""
    block = block_of(model)
    if block is None:
        part = negative_log_likelihood(model, distributed.split_evenly(list(samples)), tokenizer.pad_token_id,
                                       batch_size)
    else:
        part = pipelined_negative_log_likelihood(block, distributed.split_evenly(list(samples), block.replica,
                                                 block.replicas), tokenizer.pad_token_id, batch_size)
    totals = distributed.all_gather(part)
    nll, tokens = sum(part[0] for part in totals), sum(part[1] for part in totals)
    if tokens == 0:
        raise SafeneuronsError("the perplexity text set has no tokens to score")
    return math.exp(nll / tokens)
