"""Data sets by name or by file, and their tokenised samples (prompt + response, prompt labels -100).

Names resolve in the data directory (`--data-dir`, else $SAFENEURONS_DATA, else ./data) to the file names of
the original work (Wei et al. 2024); `demo-*` names are built in. Files: CSV with `prompt[,response][,text]`
columns (the original format, unnamed index column included), JSONL/JSON (`prompt`/`response`, alpaca-style
`instruction`/`input`/`output`, or chat `messages`), or plain text (one prompt per line).

`nsamples` larger than the data set uses every example and logs a warning (it does not fail).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import SafeneuronsError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
NAMED_FILES = {
    "align": "SFT_aligned_llama2-7b-chat-hf_train.csv",
    "align_short": "SFT_aligned_llama2-7b-chat-hf_train_short.csv",
    "alpaca_cleaned_no_safety": "alpaca_cleaned_no_safety_train.csv",
    "advbench": "advbench.txt",
}
DEMO_PREFIX = "demo-"
LLAMA2_PROMPT = "[INST] {instruction} [/INST]"
LLAMA2_SYSTEM = "<<SYS>>\n{system}\n<</SYS>>\n\n"
# Llama-2-chat's default system prompt, the one the original work evaluates with (lib/prompt_utils.py, "base").
LLAMA2_DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe. "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature. If a question does not make "
    "any sense, or is not factually coherent, explain why instead of answering something not correct. If you "
    "don't know the answer to a question, please don't share false information.")
FORMATTED_MARKERS = ("[INST]", "<|im_start|>", "<|start_header_id|>")


@dataclass(frozen=True)
class Example:
    """One record: the prompt (already in chat format when `formatted`) and the response, if the data has one."""

    prompt: str
    response: str | None = None
    formatted: bool = False
    messages: tuple[dict, ...] | None = None  # chat records: the conversation before the response


@dataclass
class Sample:
    """One tokenised example: labels are -100 on prompt tokens, so losses and statistics see the response only."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    @property
    def response_mask(self) -> torch.Tensor:
        return self.labels != IGNORE_INDEX


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    return Path(explicit or os.environ.get("SAFENEURONS_DATA") or "data").expanduser()


def known_names() -> list[str]:
    from . import demo

    return sorted(NAMED_FILES) + [DEMO_PREFIX + name for name in demo.DATASETS]


def resolve_data_path(source: str, directory: str | os.PathLike | None = None) -> Path:
    """The file behind a data set name (in the data directory) or a path; a clear error when neither exists."""
    if source in NAMED_FILES:
        path = data_dir(directory) / NAMED_FILES[source]
        if not path.is_file():
            raise SafeneuronsError(
                f"data set {source!r} needs {NAMED_FILES[source]} in the data directory {path.parent} "
                f"(set --data-dir or SAFENEURONS_DATA; the files come from the data/ folder of "
                f"github.com/boyiwei/alignment-attribution-code)")
        return path
    path = Path(source).expanduser()
    if not path.is_file():
        raise SafeneuronsError(f"data set {source!r} is neither a known name ({', '.join(known_names())}) "
                               f"nor an existing file")
    return path


def load_examples(source: str, directory: str | os.PathLike | None = None) -> list[Example]:
    """All records of a named data set or file, in file order."""
    if source.startswith(DEMO_PREFIX):
        from . import demo

        return demo.dataset(source[len(DEMO_PREFIX):])
    path = resolve_data_path(source, directory)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        examples = _read_csv(path)
    elif suffix in (".jsonl", ".json"):
        examples = _read_json(path)
    else:
        examples = [Example(_prompt_text(line)) for line in _read_text(path).splitlines() if line.strip()]
    if not examples:
        raise SafeneuronsError(f"data file {path} holds no examples")
    return examples


def _prompt_text(prompt: str) -> str:
    return prompt.strip()


def _is_formatted(prompt: str) -> bool:
    return any(marker in prompt for marker in FORMATTED_MARKERS)


def as_example(prompt: Any, response: Any = None) -> Example:
    """An Example from raw values (NaN or None response = none); chat-formatted prompts are marked as such."""
    prompt = "" if prompt is None else str(prompt)
    response = None if response is None or (isinstance(response, float) and response != response) else str(response)
    return Example(prompt, response, _is_formatted(prompt))


def _read_csv(path: Path) -> list[Example]:
    import pandas as pd

    try:
        frame = pd.read_csv(path, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise SafeneuronsError(f"data file {path} is not a readable CSV ({str(error).splitlines()[0]})") from None
    if "prompt" not in frame.columns:
        columns = ", ".join(str(column) for column in frame.columns) or "none"
        raise SafeneuronsError(f"CSV {path} has columns [{columns}]; expected prompt,response[,text]")
    responses = frame["response"] if "response" in frame.columns else [None] * len(frame)
    return [as_example(prompt, response) for prompt, response in zip(frame["prompt"], responses)]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise SafeneuronsError(f"data file {path} is not UTF-8 text (byte {error.start} cannot be decoded): "
                               f"expected CSV, JSONL/JSON or plain text") from None


def _read_json(path: Path) -> list[Example]:
    text = _read_text(path)
    try:
        if path.suffix.lower() == ".json":
            records = json.loads(text)
            records = records if isinstance(records, list) else [records]
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise SafeneuronsError(f"data file {path} is not valid JSON at line {error.lineno}: {error.msg}") from None
    return [_json_record(record, path, index) for index, record in enumerate(records, 1)]


def _json_record(record: Any, path: Path, index: int) -> Example:
    if not isinstance(record, dict):
        raise SafeneuronsError(f"record {index} of {path} is a {type(record).__name__}; expected an object")
    if "messages" in record:
        messages = list(record["messages"])
        response = messages.pop()["content"] if messages and messages[-1].get("role") == "assistant" else None
        if not messages:
            raise SafeneuronsError(f"record {index} of {path} has no message before the assistant's response")
        return Example(messages[-1]["content"], response, messages=tuple(messages))
    if "prompt" in record:
        return as_example(record["prompt"], record.get("response"))
    if "instruction" in record:
        instruction = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return as_example(instruction, record.get("output"))
    raise SafeneuronsError(f"record {index} of {path} has keys {sorted(record)}; expected prompt/response, "
                           f"instruction/output or messages")


def strip_bos(tokenizer: Any, text: str) -> str:
    bos = tokenizer.bos_token or ""
    return text[len(bos):] if bos and text.startswith(bos) else text


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


def prompt_text(tokenizer: Any, example: Example, system: str | None = None) -> str:
    """The text the model sees before the response: the data's own chat-format prompt as it is, else formatted
    (with `system` as the system message)."""
    if example.messages:
        return format_prompt(tokenizer, example.messages, system)
    return example.prompt if example.formatted else format_prompt(tokenizer, example.prompt, system)


def _response_text(example: Example) -> str | None:
    if example.response is None:
        return None
    return example.response if example.response.startswith(" ") else " " + example.response


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
    response = _response_text(example)
    if response is None:
        raise SafeneuronsError(f"example {example.prompt[:60]!r} has no response; this stage needs prompt,response data")
    prompt_ids = tokenizer(prompt_text(tokenizer, example), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
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


def check_sources(*sources: str | None, directory: str | os.PathLike | None = None) -> None:
    """Read every named data set or file once, so that a bad name or file fails before any model loads."""
    for source in sources:
        if source:
            load_examples(source, directory)
