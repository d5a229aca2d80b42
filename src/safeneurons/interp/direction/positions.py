"""The post-instruction tokens: what the chat template puts between the instruction and the response (Llama-2's
` [/INST]`, ChatML's `<|im_end|>\n<|im_start|>assistant\n`, …), found from the tokenizer's own template."""
from __future__ import annotations

from typing import Any, Sequence

from safeneurons.errors import SafeneuronsError

# Unlike instructions: their formatted prompts share only the template's tokens after the instruction
PROBES = ("Hello", "What is the capital of France?", "tell me a story.", "Sum 2 and 3")


def common_suffix(sequences: Sequence[Sequence[int]]) -> list[int]:
    suffix: list[int] = []
    for items in zip(*(reversed(sequence) for sequence in sequences)):
        if len(set(items)) != 1:
            break
        suffix.append(items[0])
    return suffix[::-1]


def post_instruction_tokens(tokenizer: Any, system: str | None = None) -> list[int]:
    """The token ids every formatted prompt ends with after its instruction (the candidates' positions)."""
    from safeneurons.data.samples import format_prompt

    suffix = common_suffix([tokenizer(format_prompt(tokenizer, probe, system))["input_ids"] for probe in PROBES])
    if not suffix:
        raise SafeneuronsError("the chat template puts no token between the instruction and the response, so there "
                               "is no post-instruction position to take the direction from")
    return suffix


def check_prompts_end_with(tokenizer: Any, prompts: Sequence[str], suffix: Sequence[int], what: str) -> None:
    """Every prompt must end with the post-instruction tokens (a prompt in another chat format would not)."""
    for index, prompt in enumerate(prompts):
        ids = tokenizer(prompt)["input_ids"]
        if list(ids[-len(suffix):]) != list(suffix):
            raise SafeneuronsError(f"{what} prompt {index + 1} does not end with the chat template's post-instruction "
                                   f"tokens {tokenizer.convert_ids_to_tokens(list(suffix))}: give plain instructions "
                                   f"(formatted here with the model's template), not prompts in another chat format")
