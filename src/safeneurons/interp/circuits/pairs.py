"""Clean and corrupted prompts of different lengths, aligned position by position.

A harmful request and a harmless one rarely tokenize to the same length, but in a chat format they share the
template: the tokens before the instruction and the post-instruction tokens after it (`<|im_end|>\\n<|im_start|>
assistant\\n`, Llama-2's ` [/INST]`), where the direction stage finds refusal. The `template` alignment matches the
tokens the two prompts share at the start one to one, and those they share at the end (the post-instruction
tokens and the final position) one to one from the end; the differing middle, the instruction, is one position
group: each clean instruction token is paired with the mean of the corrupted instruction's tokens. `equal`
demands prompts of the same length and pairs position t with position t, as EAP-IG does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from safeneurons.errors import SafeneuronsError

ALIGNMENTS = ("template", "equal")


@dataclass(frozen=True)
class PairAlignment:
    clean_length: int
    corrupted_length: int
    prefix: int  # tokens shared at the start, aligned one to one
    suffix: int  # tokens shared at the end, aligned one to one from the end

    def matrix(self) -> torch.Tensor:
        """[clean tokens, corrupted tokens]: row t averages the corrupted positions that clean position t
        receives, so that `matrix @ corrupted_activations` are the corrupted values at the clean positions."""
        matrix = torch.zeros(self.clean_length, self.corrupted_length, dtype=torch.float64)
        for position in range(self.prefix):
            matrix[position, position] = 1.0
        for back in range(1, self.suffix + 1):
            matrix[self.clean_length - back, self.corrupted_length - back] = 1.0
        middle = slice(self.prefix, self.corrupted_length - self.suffix)
        for position in range(self.prefix, self.clean_length - self.suffix):
            matrix[position, middle] = 1.0 / (middle.stop - middle.start)
        return matrix

    def to_dict(self) -> dict[str, int]:
        return {"clean_tokens": self.clean_length, "corrupted_tokens": self.corrupted_length,
                "shared_start": self.prefix, "shared_end": self.suffix}


def align_pair(clean: list[int], corrupted: list[int], rule: str, index: int = 0) -> PairAlignment:
    """The alignment of pair `index` by `rule`; an error names a pair that cannot be aligned."""
    if rule not in ALIGNMENTS:
        raise SafeneuronsError(f"--alignment {rule!r} is not one of {', '.join(ALIGNMENTS)}")
    if rule == "equal" or clean == corrupted:
        if len(clean) != len(corrupted):
            raise SafeneuronsError(f"pair {index}: --alignment equal needs prompts of the same length; the clean "
                                   f"prompt has {len(clean)} tokens, the corrupted {len(corrupted)} (use --alignment "
                                   f"template, or pairs of equal token length)")
        return PairAlignment(len(clean), len(corrupted), len(clean), 0)
    shortest = min(len(clean), len(corrupted))
    prefix = next((i for i in range(shortest) if clean[i] != corrupted[i]), shortest)
    suffix = next((i for i in range(shortest - prefix) if clean[-1 - i] != corrupted[-1 - i]), shortest - prefix)
    clean_middle, corrupted_middle = len(clean) - prefix - suffix, len(corrupted) - prefix - suffix
    if suffix == 0:
        raise SafeneuronsError(f"pair {index}: the prompts do not end with the same tokens, so their final positions "
                               f"cannot be aligned; give instructions in the model's chat format (not --raw)")
    if clean_middle and not corrupted_middle:
        raise SafeneuronsError(f"pair {index}: the corrupted prompt has no instruction tokens to pair with the clean "
                               f"prompt's {clean_middle}; it must differ from the clean one in its instruction")
    return PairAlignment(len(clean), len(corrupted), prefix, suffix)
