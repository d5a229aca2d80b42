"""The tokens both models read: text from data sets, or random ids, packed into batches."""
from __future__ import annotations

import logging
import random
from typing import Any, Sequence

import torch

from safeneurons.errors import SafeneuronsError

log = logging.getLogger(__name__)


def check_same_tokenizer(tokenizer_a: Any, tokenizer_b: Any, name_a: str = "base", name_b: str = "other") -> None:
    """Refuse models that read text differently: activation matching needs both to see the same token ids."""
    vocab_a, vocab_b = tokenizer_a.get_vocab(), tokenizer_b.get_vocab()
    if vocab_a == vocab_b:
        return
    differing = sorted(token for token in vocab_a.keys() | vocab_b.keys() if vocab_a.get(token) != vocab_b.get(token))
    example = differing[0]
    raise SafeneuronsError(
        f"models {name_a} and {name_b} have different tokenizers ({len(vocab_a)} vs {len(vocab_b)} tokens, "
        f"{len(differing)} differing; token {example!r} has id {vocab_a.get(example)} vs {vocab_b.get(example)}); "
        f"activation matching needs both models to read the same token ids")


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
