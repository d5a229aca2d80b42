"""The tokens both models read: text from data sets, or random ids, packed into batches."""
from __future__ import annotations

import logging
import random
from typing import Any, Sequence

import torch

log = logging.getLogger(__name__)


def _example_text(tokenizer: Any, example: Any) -> str:
    from safeneurons.data.samples import prompt_text

    response = example.response or ""
    return prompt_text(tokenizer, example) + (response if not response or response.startswith(" ") else " " + response)


def text_token_ids(tokenizer: Any, sources: Sequence[str], n_tokens: int, seed: int,
                   data_dir: str | None = None) -> list[int]:
    """`n_tokens` token ids from the texts (prompt and response) of the data sets, shuffled with `seed`."""
    from safeneurons.data.readers import load_examples

    examples = [example for source in sources for example in load_examples(source, data_dir)]
    random.Random(seed).shuffle(examples)
    ids: list[int] = []
    for example in examples:
        ids.extend(tokenizer(_example_text(tokenizer, example))["input_ids"])
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    log.warning("the data holds %d tokens, fewer than --n-tokens %d: tracing on all of them", len(ids), n_tokens)
    return ids


def random_token_ids(vocab_size: int, n_tokens: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(vocab_size, (n_tokens,), generator=generator).tolist()


def pack_tokens(ids: Sequence[int], length: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Token ids cut into sequences of `length` (the last one right-padded and masked), in batches."""
    sequences = [list(ids[start:start + length]) for start in range(0, len(ids), length)]
    batches = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        input_ids = torch.zeros((len(chunk), len(chunk[0])), dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, sequence in enumerate(chunk):
            input_ids[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[row, :len(sequence)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return batches
