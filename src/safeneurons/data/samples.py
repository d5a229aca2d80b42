"""Examples become samples as the original work builds them: prompt tokens (labels -100), then the
response's; calibration sets drawn as the original draws them; batches padded.
"""
from __future__ import annotations

import functools
import logging
import os
import re
from typing import TYPE_CHECKING, Any, Sequence

import torch

from safeneurons.data.examples import IGNORE_INDEX, LLAMA2_PROMPT, LLAMA2_SYSTEM, Sample
from safeneurons.data.readers import load_examples
from safeneurons.errors import SafeneuronsError

if TYPE_CHECKING:
    from safeneurons.data.examples import Example

log = logging.getLogger(__name__)
LLAMA2_BARE = re.compile(r"\[INST\]\s*((?:(?!<<SYS>>).)*?)\s*\[/INST\]", re.DOTALL)


def adds_bos(tokenizer: Any) -> bool:
    """Whether tokenising a text puts BOS first (Llama's tokenizers do; SmolLM2's, whose BOS is <|im_start|>,
    does not)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def strip_bos(tokenizer: Any, text: str) -> str:
    """The chat template's text without its leading BOS when tokenisation adds BOS itself (no doubled BOS), and
    as it is otherwise (where BOS is a token the template needs, such as ChatML's <|im_start|>)."""
    bos = tokenizer.bos_token or ""
    return text[len(bos):] if bos and text.startswith(bos) and adds_bos(tokenizer) else text


def format_prompt(tokenizer: Any, instruction: str | Sequence[dict], system: str | None = None) -> str:
    """A plain instruction (or a chat conversation) in the model's chat format: its chat template, else
    Llama-2's `[INST]` format; `system` is put first as a system message (Llama-2's `<<SYS>>` block without a
    template). The leading BOS text is removed because tokenisation adds BOS itself."""
    messages = [{"role": "user", "content": instruction}] if isinstance(instruction, str) else list(instruction)
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if system and system not in text:
            raise SafeneuronsError("this model's chat template drops system messages, so a system prompt cannot be "
                                   "applied; use --system-prompt none")
        return strip_bos(tokenizer, text)
    content = messages[-1]["content"]
    if system is not None:
        content = f"{LLAMA2_SYSTEM.format(system=system)}{content}"
    return LLAMA2_PROMPT.format(instruction=content)


def llama2_instruction(prompt: str) -> str | None:
    """The instruction of a bare Llama-2 prompt (`[INST] … [/INST]`, no system block), else None."""
    match = LLAMA2_BARE.fullmatch(prompt.strip())
    return match.group(1) if match else None


def uses_llama2_format(tokenizer: Any) -> bool:
    return format_prompt(tokenizer, "x").lstrip().startswith("[INST]")


def prompt_text(tokenizer: Any, example: Example, system: str | None = None) -> str:
    """The text the model sees before the response: the data's own chat-format prompt as it is, else formatted
    (with `system` as the system message). A bare Llama-2 prompt (the original work's data) given to a model of
    another chat format is re-formatted in the model's own template: its instruction is what the data means."""
    if example.messages:
        return format_prompt(tokenizer, example.messages, system)
    if not example.formatted:
        return format_prompt(tokenizer, example.prompt, system)
    instruction = llama2_instruction(example.prompt)
    if instruction is not None and not uses_llama2_format(tokenizer):
        return format_prompt(tokenizer, instruction, system)
    return example.prompt


RESPONSE_MARK = "\u2063RESPONSE\u2063"  # a text no template writes, to find where the assistant's content starts


def response_separator(tokenizer: Any) -> str:
    """What the chat format puts between the generation prompt and the assistant's text, so that a response is
    built as the model's own template renders one: Llama-2's format (and the demo's template) put a space after
    `[/INST]`, ChatML nothing after `<|im_start|>assistant\\n`. Read from the template's rendering of an assistant
    turn; where that rendering does not extend the generation prompt by whitespace alone (templates that rewrite
    past turns), a prompt ending in whitespace takes none and any other a space."""
    template = getattr(tokenizer, "chat_template", None)
    return _template_separator(tokenizer, template) if template else " "


@functools.lru_cache(maxsize=16)
def _template_separator(tokenizer: Any, template: str) -> str:
    """`response_separator` of a tokenizer with `template` (cached: it is asked for every sample)."""
    user = [{"role": "user", "content": "x"}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    turn = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": RESPONSE_MARK}], tokenize=False)
    between = turn[len(prompt):turn.find(RESPONSE_MARK)] if turn.startswith(prompt) else None
    if between is not None and between.strip() == "" and RESPONSE_MARK in turn:
        return between
    return "" if prompt[-1:].isspace() else " "


def response_text(tokenizer: Any, response: str) -> str:
    """A response as it follows the prompt in the model's chat format: the template's separator, then the text
    (whose one leading space, the Llama-2 convention of the original work's files, is the separator's place)."""
    return response_separator(tokenizer) + response.removeprefix(" ")


def select(examples: Sequence[Example], nsamples: int | None, seed: int) -> list[Example]:
    """`nsamples` examples drawn as the original work draws its calibration set: the `datasets` library's
    `shuffle(seed=seed)`, then the first `nsamples` (so the same seed gives the same samples); all of them, in
    file order and with a warning, when fewer exist."""
    if nsamples is None or nsamples >= len(examples):
        if nsamples is not None and nsamples > len(examples):
            log.warning("nsamples=%d is larger than the data set (%d examples): using all %d",
                        nsamples, len(examples), len(examples))
        return list(examples)
    if nsamples <= 0:
        raise SafeneuronsError(f"nsamples={nsamples} must be a positive integer")
    from datasets import Dataset

    order = Dataset.from_dict({"index": range(len(examples))}).shuffle(seed=seed).select(range(nsamples))["index"]
    return [examples[index] for index in order]


def tokenize_example(tokenizer: Any, example: Example, max_length: int, add_eos: bool = False) -> Sample:
    """Prompt (with BOS) followed by the response (and EOS with `add_eos`; the original work appends none), cut to
    `max_length` tokens."""
    if example.response is None:
        raise SafeneuronsError(f"example {example.prompt[:60]!r} has no response; this stage needs prompt,response data")
    prompt_ids = tokenizer(prompt_text(tokenizer, example), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response_text(tokenizer, example.response), add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return Sample(torch.tensor(input_ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long))


def build_samples(examples: Sequence[Example], tokenizer: Any, nsamples: int | None, seed: int,
                  max_length: int, add_eos: bool = False) -> list[Sample]:
    """Draw `nsamples` examples with `seed`, tokenise them; examples whose response is cut away are dropped."""
    if max_length < 2:
        raise SafeneuronsError(f"max_length={max_length} must be at least 2 tokens")
    samples = [tokenize_example(tokenizer, example, max_length, add_eos) for example in select(examples, nsamples, seed)]
    kept = [sample for sample in samples if bool(sample.response_mask.any())]
    if not kept:
        raise SafeneuronsError(f"every response is empty after truncation to max_length={max_length} tokens; "
                               f"raise --max-length")
    if len(kept) < len(samples):
        log.warning("%d of %d samples have no response tokens left after truncation to %d tokens and are skipped",
                    len(samples) - len(kept), len(samples), max_length)
    return kept


def load_samples(source: str, tokenizer: Any, nsamples: int | None, seed: int, max_length: int,
                 directory: str | os.PathLike | None = None, add_eos: bool = False) -> list[Sample]:
    return build_samples(load_examples(source, directory), tokenizer, nsamples, seed, max_length, add_eos)


def load_prompts(source: str, tokenizer: Any, limit: int | None = None,
                 directory: str | os.PathLike | None = None, system: str | None = None) -> list[str]:
    """Prompts in the model's chat format (with `system` as the system message), the first `limit` of the file
    (for evaluation and patching). Prompts already in chat format are kept as they are."""
    examples = load_examples(source, directory)[:limit]
    if system is not None and any(example.formatted for example in examples):
        log.warning("%s holds prompts already in chat format: they keep their own system prompt, if any", source)
    return [prompt_text(tokenizer, example, system) for example in examples]


def pad_batch(samples: Sequence[Sample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `labels` (-100 on padding) and `attention_mask` for a list of samples."""
    length = max(len(sample.input_ids) for sample in samples)
    input_ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        size = len(sample.input_ids)
        input_ids[row, :size] = sample.input_ids
        labels[row, :size] = sample.labels
        attention_mask[row, :size] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
