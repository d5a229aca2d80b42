"""Records of a data set: an example (prompt, response) and a tokenized sample, and the prompt formats."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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
    """The folder of the named data sets' files: --data-dir, else $SAFENEURONS_DATA, else ./data."""
    return Path(explicit or os.environ.get("SAFENEURONS_DATA") or "data").expanduser()


def clean_prompt(prompt: str) -> str:
    return prompt.strip()


def _is_formatted(prompt: str) -> bool:
    return any(marker in prompt for marker in FORMATTED_MARKERS)


def as_example(prompt: Any, response: Any = None) -> Example:
    """An Example from raw values (NaN or None response = none); chat-formatted prompts are marked as such."""
    prompt = "" if prompt is None else str(prompt)
    response = None if response is None or (isinstance(response, float) and response != response) else str(response)
    return Example(prompt, response, _is_formatted(prompt))
