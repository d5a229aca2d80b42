"""Generation on a layer-sharded model (`--shard layers`, models.blocks), with a KV cache per stage.

Each replica takes its share of the prompts (round robin, as `generate_distributed` splits them across ranks) in
the batches `generate` would run. A batch's tokens enter the first stage and its hidden states flow stage to stage,
each stage caching its own layers' keys and values; the last stage picks the next tokens and sends them, with
whether the whole batch has finished, back to every stage. The batches go in waves of as many as there are
stages: while the last stage picks one batch's tokens the stages below run the others, so the ring stays busy.

The decoding is `generate`'s: greedy argmax, or multinomial sampling of the logits over the temperature from
the seed `generate` would draw the batch from; a sequence that reached EOS continues with padding; the batch
stops when all have. The tokens are those of the unsharded model. A schedule of `torch.distributed.pipelining`
cannot express this loop (the next step's input comes back from the last stage), hence `StageLink`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch

from safeneurons.errors import SafeneuronsError
from safeneurons.runtime import distributed
from safeneurons.runtime.pipeline import StageLink

if TYPE_CHECKING:
    from safeneurons.evaluation.decoding import Decoding
    from safeneurons.models.blocks import LayerBlock

# generation settings whose logits processors this loop does not apply (`generate` would)
UNSUPPORTED_SETTINGS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": None,
                        "min_length": 0, "bad_words_ids": None, "suppress_tokens": None,
                        "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
                        "sequence_bias": None}


@dataclass
class BatchInFlight:
    """One generation batch on this stage: what its next forward takes, and on the last stage what it made."""

    tokens: torch.Tensor  # the first stage's next input: the prompts, then each step's new tokens
    mask: torch.Tensor
    positions: torch.Tensor
    cache: Any
    generator: torch.Generator | None = None  # sampled decoding (last stage)
    unfinished: torch.Tensor | None = None
    new_tokens: list[torch.Tensor] = field(default_factory=list)
    done: bool = False


def check_decoding_settings(model: Any) -> None:
    config = getattr(model, "generation_config", None)
    for name, default in UNSUPPORTED_SETTINGS.items():
        value = getattr(config, name, default)
        if value not in (default, None, 0, [], ()):
            raise SafeneuronsError(f"--shard layers: the model's generation config sets {name}={value!r}, which "
                                   f"layer-sharded generation does not apply; run it unsharded")


@torch.no_grad()
def pipelined_generate(block: LayerBlock, tokenizer: Any, prompts: Sequence[str], decoding: Decoding,
                       batch_size: int, desc: str = "generating") -> dict[int, list[str]]:
    """Collective: this replica's generations by prompt index, on its last stage (empty elsewhere)."""
    check_decoding_settings(block.model)
    mine = distributed.assign_round_robin(len(prompts), block.replica, block.replicas)
    texts = [prompts[index] for index in mine]
    link = block.link()
    starts = list(range(0, len(texts), batch_size))
    waves = [starts[index:index + block.split.stages] for index in range(0, len(starts), block.split.stages)]
    original_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    generations: list[list[str]] = []
    try:
        for wave in distributed.progress(waves, desc=desc, unit="wave", leave=False):
            batches = [_open_batch(block, tokenizer, texts[start:start + batch_size], start,
                                   decoding, block.replica * len(prompts)) for start in wave]
            _run_wave(block, link, batches, decoding, tokenizer)
            for batch in batches:
                generations += _decoded(batch, tokenizer, decoding.n_samples) if block.last else []
    finally:
        tokenizer.padding_side = original_side
        link.finish()
    return dict(zip(mine, generations))


def _open_batch(block: LayerBlock, tokenizer: Any, texts: Sequence[str], start: int, decoding: Decoding,
                first_index: int) -> BatchInFlight:
    encoded = tokenizer(list(texts), return_tensors="pt", padding=True).to(block.device)
    ids = encoded["input_ids"].repeat_interleave(decoding.n_samples, dim=0)  # as generate's num_return_sequences
    mask = encoded["attention_mask"].repeat_interleave(decoding.n_samples, dim=0)
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # left padding: generate's positions
    batch = BatchInFlight(ids, mask, positions, block.new_cache())
    if block.last:
        batch.unfinished = torch.ones(ids.shape[0], dtype=torch.long, device=block.device)
        if decoding.sampled:  # the seed `generate` draws this batch from
            batch.generator = torch.Generator(block.device).manual_seed(decoding.seed + first_index + start)
    return batch


def _run_wave(block: LayerBlock, link: StageLink, batches: Sequence[BatchInFlight], decoding: Decoding,
              tokenizer: Any) -> None:
    """Every step of every batch of the wave, in the same order on every stage."""
    for step in range(decoding.max_new_tokens):
        for batch in (batch for batch in batches if not batch.done):
            if step > 0 and not _take_verdict(block, link, batch):
                continue
            received = block.receive(link, (batch.mask.shape[0], batch.positions.shape[1]))
            output = block.run(batch.tokens, received, attention_mask=batch.mask, position_ids=batch.positions,
                               cache=batch.cache, use_cache=True, logits_to_keep=1)
            if block.last:
                _choose_next(block, link, batch, output, decoding, tokenizer, last_step=step + 1 ==
                             decoding.max_new_tokens)
            else:
                link.send_activation(output)
            batch.mask = torch.cat([batch.mask, batch.mask.new_ones(batch.mask.shape[0], 1)], dim=-1)
            batch.positions = batch.positions[:, -1:] + 1


def _take_verdict(block: LayerBlock, link: StageLink, batch: BatchInFlight) -> bool:
    """Whether the batch runs another step (the last stage decided it); the first stage also takes the tokens."""
    if not block.last:
        message = link.receive_from_last_stage((batch.mask.shape[0] + 1,), torch.long)
        batch.done = bool(message[-1])
        batch.tokens = message[:-1, None]
    return not batch.done


def _choose_next(block: LayerBlock, link: StageLink, batch: BatchInFlight, logits: torch.Tensor, decoding: Decoding,
                 tokenizer: Any, last_step: bool) -> None:
    """`generate`'s choice of the next tokens; unless it was the last step, sent with the batch's verdict."""
    scores = logits[:, -1].to(copy=True, dtype=torch.float32)
    if decoding.sampled:
        probabilities = torch.softmax(scores / decoding.temperature, dim=-1)
        chosen = torch.multinomial(probabilities, num_samples=1, generator=batch.generator).squeeze(1)
    else:
        chosen = scores.argmax(dim=-1)
    chosen = chosen * batch.unfinished + tokenizer.pad_token_id * (1 - batch.unfinished)
    if tokenizer.eos_token_id is not None:
        batch.unfinished = batch.unfinished & (chosen != tokenizer.eos_token_id).long()
    batch.new_tokens.append(chosen)
    batch.tokens = chosen[:, None]
    batch.done = not bool(batch.unfinished.any())
    if not last_step:
        link.send_to_every_stage(torch.cat([chosen, chosen.new_tensor([int(batch.done)])]))


def _decoded(batch: BatchInFlight, tokenizer: Any, n_samples: int) -> list[list[str]]:
    texts = tokenizer.batch_decode(torch.stack(batch.new_tokens, dim=1), skip_special_tokens=True)
    return [texts[row:row + n_samples] for row in range(0, len(texts), n_samples)]
