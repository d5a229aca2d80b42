"""`safeneurons defend --method antidote`: Antidote (Huang et al. 2024, arXiv 2408.09600), one-shot pruning after
fine-tuning of the weights with the highest Wanda scores on harmful data — `score --method wanda` on the re-alignment
(harmful prompt + harmful answer) data, then `prune`, as one step.

As in the paper's code (git-disl/Antidote, `dense_ratio`, 0.1 by default in its train.py), each output row of the
pruned Linears loses its top `sparsity_ratio` of weights by |W| · ‖X‖₂, scored on the fine-tuned model with nothing
pruned while scoring. The pruned Linears are the authors' in full fine-tuning, the attention's q, k and v
(`modules`, `--antidote-modules`); `all` prunes every Linear of every layer, a wider variant of ours. Their main
LoRA setting prunes only the fine-tuning adapter's `lora_A`/`lora_B` of q, k and v: this package's LoRA runs save
merged weights (no adapter to prune), so that variant is not offered. Departures: the norms are taken over the
response tokens only (this package's scoring convention; the paper's hooks see every token), and a row keeps
int(cols · ratio) weights selected by a descending stable sort where the paper's ascending sort zeroes
cols − int(cols · (1 − ratio)) (the two counts can differ by one). The masks go into the output folder
(`antidote_masks/`), beside the pruned model.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safeneurons.data.readers import check_sources
from safeneurons.errors import SafeneuronsError
from safeneurons.interventions.prune import PruneResult, prune_files
from safeneurons.models.loading import ModelSource, open_matching_checkpoints
from safeneurons.runtime import distributed
from safeneurons.runtime.checkpoints import CheckpointFiles, rewrite_checkpoint, write_on_main
from safeneurons.runtime.outputs import check_output_dir
from safeneurons.scores.config import ScoreConfig
from safeneurons.scores.run import run_score

SUMMARY_FILE = "antidote_summary.json"
MASKS_FOLDER = "antidote_masks"
DEFAULT_SPARSITY = 0.1  # the paper code's default dense_ratio
AUTHORS_MODULES = ("q_proj", "k_proj", "v_proj")  # the Linears the authors prune in full fine-tuning


@dataclass(frozen=True)
class AntidoteConfig:
    finetuned: str  # the fine-tuned model to repair
    harmful_data: str  # the re-alignment data: harmful prompts with harmful answers
    sparsity_ratio: float = DEFAULT_SPARSITY  # of each row; 0 leaves the model as it is
    nsamples: int = 128
    max_length: int = 512
    batch_size: int = 1
    seed: int = 0
    data_dir: str | None = None
    dtype: str = "float32"
    deepspeed: str | None = None  # score under ZeRO-3; the prune streams the files either way
    cache_dir: str | None = None
    modules: tuple[str, ...] | None = AUTHORS_MODULES  # the pruned Linears by module name; None = every Linear

    def score_config(self) -> ScoreConfig:
        return ScoreConfig("wanda", self.harmful_data, self.sparsity_ratio, nsamples=self.nsamples, seed=self.seed,
                           max_length=self.max_length, data_dir=self.data_dir, batch_size=self.batch_size)

    def validate(self) -> None:
        if not 0 <= self.sparsity_ratio < 1:
            raise SafeneuronsError(f"--antidote-sparsity {self.sparsity_ratio!r} must lie in [0, 1)")
        if self.modules is not None and (not self.modules or not all(self.modules)):
            raise SafeneuronsError(f"--antidote-modules {','.join(self.modules)!r} must name Linears (q_proj,k_proj,"
                                   f"v_proj) or be 'all'")
        if self.sparsity_ratio > 0:
            self.score_config().validate()


@dataclass
class AntidoteResult:
    pruned: PruneResult | None  # None for sparsity 0

    def to_json(self, config: AntidoteConfig) -> dict[str, Any]:
        return {"method": "antidote", "sparsity_ratio": config.sparsity_ratio, "harmful_data": config.harmful_data,
                "modules": "all" if config.modules is None else list(config.modules),
                "nsamples": config.nsamples, "max_length": config.max_length, "finetuned": config.finetuned,
                **(self.pruned.to_json() if self.pruned else {"pruned": 0})}


def prune_keeping_masks(config: AntidoteConfig, masks: Path, staging: Path) -> AntidoteResult:
    result = AntidoteResult(prune_files(config.finetuned, str(masks), staging, config.cache_dir,
                                        modules=config.modules))
    shutil.move(masks, staging / MASKS_FOLDER)
    return result


def copy_unchanged(finetuned: CheckpointFiles, staging: Path) -> AntidoteResult:
    rewrite_checkpoint(finetuned, staging, lambda name, tensor: tensor)
    return AntidoteResult(None)


def check_modules(finetuned: CheckpointFiles, modules: tuple[str, ...] | None) -> None:
    """Every named module exists in the checkpoint (from its headers, before any scoring)."""
    present = {name.split(".")[-2] for name, (shape, _) in finetuned.metadata().items()
               if len(shape) == 2 and re.search(r"\.layers\.\d+\.", name)}
    missing = [module for module in modules or () if module not in present]
    if missing:
        raise SafeneuronsError(f"--antidote-modules: {', '.join(missing)} is not a Linear of the fine-tuned model "
                               f"(it has {', '.join(sorted(present))})")


def run_antidote(config: AntidoteConfig, out: str | Path) -> AntidoteResult | None:
    """Collective (the scoring): the pruned model as an HF folder at `out` with antidote_summary.json and the masks,
    staged and published with one rename. The result on rank 0 (None on the others)."""
    config.validate()
    check_output_dir(out)
    check_sources(config.harmful_data, directory=config.data_dir)
    (finetuned,) = open_matching_checkpoints({"--finetuned": config.finetuned}, config.cache_dir)
    check_modules(finetuned, config.modules)
    def summary_of(result: AntidoteResult) -> dict[str, Any]:
        return result.to_json(config)

    if config.sparsity_ratio == 0:  # the off setting: the fine-tuned model's files as they are
        return write_on_main(out, lambda staging: copy_unchanged(finetuned, staging), SUMMARY_FILE, summary_of)
    masks = Path(out).with_name(f".{Path(out).name}.{MASKS_FOLDER}")
    try:
        run_score(ModelSource(config.finetuned, config.dtype, config.deepspeed, config.cache_dir),
                  config.score_config(), masks)
        return write_on_main(out, lambda staging: prune_keeping_masks(config, masks, staging), SUMMARY_FILE,
                             summary_of)
    finally:
        if distributed.is_main():
            shutil.rmtree(masks, ignore_errors=True)
