"""What `trace` is asked (TraceConfig): checked before any model loads; read by the whole-model and the
layer-sharded runs alike."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safeneurons.data.readers import check_sources
from safeneurons.errors import SafeneuronsError
from safeneurons.interp.tracing.assignment import DEFAULT_ALPHA, DEFAULT_BATCH_SIZE, DEFAULT_DATA
from safeneurons.models.loading import ModelSource
from safeneurons.runtime.outputs import check_output_dir


@dataclass(frozen=True)
class TraceConfig:
    base: ModelSource
    other: ModelSource  # the model tested against `base`
    data: str = DEFAULT_DATA  # comma-separated data set names or files whose texts give the tokens
    random_tokens: bool = False  # uniformly random token ids instead of `data`
    n_tokens: int = 2048
    max_length: int = 128
    batch_size: int = DEFAULT_BATCH_SIZE
    all_layers: bool = False  # every layer of base against every layer of other
    alpha: float = DEFAULT_ALPHA
    solver: str = "auto"
    memory_limit_gib: float = 8.0  # activations kept in memory per rank; beyond it they spill to disk
    spill_dir: str | None = None
    seed: int = 0
    data_dir: str | None = None

    @property
    def sources(self) -> list[str]:
        from safeneurons.data.hub import split_source_list

        return split_source_list(self.data)

    def validate(self) -> None:
        for name in ("n_tokens", "max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise SafeneuronsError(f"--{name.replace('_', '-')} {getattr(self, name)} must be a positive integer")
        if not 0 < self.alpha < 1:
            raise SafeneuronsError(f"--alpha {self.alpha} must lie strictly between 0 and 1")
        if self.memory_limit_gib < 0:
            raise SafeneuronsError(f"--memory-limit {self.memory_limit_gib} GiB must not be negative")

    def check_inputs(self, out: str | Path) -> None:
        self.validate()
        check_output_dir(out)
        if not self.random_tokens:
            check_sources(*self.sources, directory=self.data_dir)
