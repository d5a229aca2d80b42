"""Greedy (or sampled) generation in batches, split across ranks and lock-step under ZeRO-3."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from safeneurons.evaluation.decoding import Decoding
from safeneurons.runtime import distributed


def batch_starts(n_items: int, batch_size: int, lockstep: bool) -> list[int | None]:
    """Start indices of this rank's batches. In lock-step (ZeRO-3: every forward is collective) every rank runs
    as many batches as the busiest one; the extra ones are None: run a stand-in batch and drop its result."""
    starts: list[int | None] = list(range(0, n_items, batch_size))
    if lockstep:
        starts += [None] * (max(distributed.all_gather(len(starts))) - len(starts))
    return starts


STAND_IN_PROMPT = "Hello"  # what a rank without a batch of its own generates from, in lock-step


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[str], decoding: Decoding = Decoding(),
             batch_size: int = 16, first_index: int = 0, desc: str = "generating") -> list[list[str]]:
    """`decoding.n_samples` continuations of each prompt (the new text only; tokenisation adds BOS), batched with
    left padding. A sampled batch draws from the seed `decoding.seed + first_index + its offset`. Collective
    under ZeRO-3 (lock-step)."""
    from safeneurons.runtime.zero3 import is_zero3_partitioned

    device = next(model.parameters()).device
    lockstep = is_zero3_partitioned(model)
    original_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    sampling = dict(do_sample=True, temperature=decoding.temperature, top_p=1.0, top_k=0) if decoding.sampled \
        else dict(do_sample=False)
    outputs: list[list[str]] = []
    try:
        starts = batch_starts(len(prompts), batch_size, lockstep)
        for start in distributed.progress(starts, desc=desc, unit="batch", leave=False):
            if decoding.sampled:
                torch.manual_seed(decoding.seed + first_index + (start or 0))
            texts = [STAND_IN_PROMPT] if start is None else list(prompts[start:start + batch_size])
            batch = tokenizer(texts, return_tensors="pt", padding=True).to(device)
            generated = model.generate(**batch, max_new_tokens=decoding.max_new_tokens,
                                       num_return_sequences=decoding.n_samples, pad_token_id=tokenizer.pad_token_id,
                                       eos_token_id=tokenizer.eos_token_id, synced_gpus=lockstep, **sampling)
            if start is None:
                continue
            texts = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            outputs.extend(texts[row:row + decoding.n_samples] for row in range(0, len(texts), decoding.n_samples))
    finally:
        tokenizer.padding_side = original_side
    return outputs


def generate_distributed(model: nn.Module, tokenizer: Any, prompts: Sequence[str], decoding: Decoding = Decoding(),
                         batch_size: int = 16, desc: str = "generating") -> list[list[str]] | None:
    """The one generation entry point of evaluation and judging: `generate` with the prompts split round-robin
    across the ranks (each rank holding the whole model, or its ZeRO-3 partition), or pipelined through the
    stages of a layer-sharded model; all generations, in prompt order, on rank 0 (None elsewhere). Another engine
    (vLLM) would plug in here."""
    from safeneurons.evaluation.pipelined_generation import pipelined_generate
    from safeneurons.models.blocks import block_of

    block = block_of(model)
    if block is not None:
        texts = pipelined_generate(block, tokenizer, prompts, decoding, batch_size, desc)
    else:
        mine = distributed.assign_round_robin(len(prompts))
        texts = dict(zip(mine, generate(model, tokenizer, [prompts[index] for index in mine], decoding, batch_size,
                                        first_index=distributed.rank() * len(prompts), desc=desc)))
    merged = distributed.merge_dicts_to_main(texts)
    return None if merged is None else [merged[index] for index in range(len(prompts))]
