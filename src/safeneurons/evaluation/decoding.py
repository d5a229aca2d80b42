"""How generation decodes: greedy, or sampled at a temperature from a seed."""
from __future__ import annotations

from dataclasses import dataclass

from safeneurons.errors import SafeneuronsError
from safeneurons.evaluation.metrics import DEFAULT_MAX_NEW_TOKENS


@dataclass(frozen=True)
class Decoding:
    """Greedy (`temperature` 0, one generation per prompt) or sampled: `n_samples` generations per prompt at
    `temperature`, reproducible with `seed` for the same prompts, batch size and rank count."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    n_samples: int = 1
    temperature: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise SafeneuronsError(f"--max-new-tokens {self.max_new_tokens} must be a positive integer")
        if self.n_samples < 1:
            raise SafeneuronsError(f"--n-samples {self.n_samples} must be a positive integer")
        if not self.temperature >= 0:
            raise SafeneuronsError(f"--temperature {self.temperature} must be >= 0 (0 = greedy)")
        if self.n_samples > 1 and self.temperature == 0:
            raise SafeneuronsError(f"--n-samples {self.n_samples} needs --temperature > 0: greedy decoding gives the "
                                   f"same generation every time")

    @property
    def sampled(self) -> bool:
        return self.temperature > 0
