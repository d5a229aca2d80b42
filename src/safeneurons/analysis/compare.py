"""Masks before vs after fine-tuning: counts, overlap, Jaccard (in all, per layer, per module type) and the drift
of the frozen and the free weights between two models.

Masks and weights are read one parameter at a time (mask files through `MaskReader`, model folders through
safetensors), and under N ranks the parameters are split across the ranks, so no rank holds a whole model.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from safeneurons.analysis.plots import pyplot, save_figure
from safeneurons.errors import SafeneuronsError
from safeneurons.finetune.drift import DriftStats
from safeneurons.masks.io import MaskReader
from safeneurons.runtime import distributed
from safeneurons.runtime.outputs import check_output_dir

log = logging.getLogger(__name__)

SUMMARY_FILE = "analysis_summary.json"
PLOT_FILE = "overlap_per_layer.png"
LAYER_PATTERN = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class OverlapCounts:
    """Selected counts of two masks over the same elements; overlap = |A∩B|/|A|, Jaccard = |A∩B|/|A∪B|
    (None where the denominator is zero)."""

    before: int = 0
    after: int = 0
    intersection: int = 0
    total: int = 0

    def add(self, other: "OverlapCounts") -> None:
        self.before += other.before
        self.after += other.after
        self.intersection += other.intersection
        self.total += other.total

    @property
    def union(self) -> int:
        return self.before + self.after - self.intersection

    @property
    def overlap(self) -> float | None:
        return self.intersection / self.before if self.before else None

    @property
    def jaccard(self) -> float | None:
        return self.intersection / self.union if self.union else None

    def to_json(self) -> dict:
        return {**asdict(self), "union": self.union, "overlap": self.overlap, "jaccard": self.jaccard}

    @classmethod
    def of(cls, before: torch.Tensor, after: torch.Tensor) -> "OverlapCounts":
        return cls(int(before.sum()), int(after.sum()), int((before & after).sum()), before.numel())


@dataclass
class MaskComparison:
    """The comparison of two masks: in all, per decoder layer and per module type (q_proj, …, down_proj)."""

    overall: OverlapCounts
    per_layer: dict[str, OverlapCounts] = field(default_factory=dict)
    per_module: dict[str, OverlapCounts] = field(default_factory=dict)
    drift: DriftStats | None = None

    def to_json(self) -> dict:
        return {"original_safety_critical_count": self.overall.before,
                "new_safety_critical_count": self.overall.after,
                "total_neurons": self.overall.total,  # the seed's key; it counts the masks' weights
                "total_weights": self.overall.total,
                "intersection_count": self.overall.intersection,
                "overlap": self.overall.overlap,
                "jaccard": self.overall.jaccard,
                "per_layer": {key: value.to_json() for key, value in self.per_layer.items()},
                "per_module": {key: value.to_json() for key, value in self.per_module.items()},
                "weight_drift": None if self.drift is None else self.drift.to_json()}


def layer_of(name: str) -> str:
    """The decoder layer index in a parameter name ("model.layers.3.mlp.up_proj.weight" -> "3"), else "other"."""
    match = LAYER_PATTERN.search("." + name)
    return match.group(1) if match else "other"


def module_of(name: str) -> str:
    """The module type of a parameter name ("model.layers.3.mlp.up_proj.weight" -> "up_proj")."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else name


class _TensorSource:
    """Named tensors read one at a time from a mask file/folder, a torch.save'd dict, a model folder or a dict."""

    def __init__(self, names: list[str], getter: Callable[[str], torch.Tensor]) -> None:
        self.names = names
        self.get = getter


def mask_source(source: Any) -> _TensorSource:
    if isinstance(source, Mapping):
        return _TensorSource(list(source), lambda name: source[name].to(torch.bool))
    path = Path(source)
    if path.suffix == ".pt":
        if not path.is_file():
            raise SafeneuronsError(f"mask file {path} does not exist")
        masks = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(masks, Mapping):
            raise SafeneuronsError(f"{path} holds a {type(masks).__name__}; expected a dict of parameter name -> mask")
        return mask_source(masks)
    reader = MaskReader(path)
    return _TensorSource(reader.names, reader.get)


def weight_source(source: Any, cache_dir: str | None = None) -> _TensorSource:
    """Parameters of a model: an nn.Module / state dict, or a local HF folder (or `demo`) read with safetensors."""
    if isinstance(source, torch.nn.Module):
        source = dict(source.named_parameters())
    if isinstance(source, Mapping):
        return _TensorSource(list(source), lambda name: source[name].detach().cpu())
    from safeneurons.models.loading import local_model_folder
    from safeneurons.runtime.checkpoints import CheckpointFiles

    files = CheckpointFiles(local_model_folder(str(source), cache_dir))
    return _TensorSource(list(files.weight_map), files.get)


def _check_same_names(before: _TensorSource, after: _TensorSource, what: str) -> list[str]:
    missing = sorted(set(before.names) ^ set(after.names))
    if missing:
        raise SafeneuronsError(f"the {what} do not cover the same parameters: {missing[0]!r} is in only one of them")
    return sorted(before.names, key=_natural_key)


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _mine(names: list[str]) -> list[str]:
    return distributed.split_evenly(names)


def compare_masks(before: Any, after: Any, frozen_masks: Any = None, model_before: Any = None,
                  model_after: Any = None, cache_dir: str | None = None) -> MaskComparison | None:
    """Compare two masks (paths or dicts) and, given both models, measure the drift of the weights that
    `frozen_masks` (default: `before`) selects against the rest. Collective under N ranks (each rank reads its
    share of the parameters); the result on rank 0, None elsewhere."""
    before_source, after_source = mask_source(before), mask_source(after)
    names = _check_same_names(before_source, after_source, "two masks")
    partial: dict[str, OverlapCounts] = {}
    for name in _mine(names):
        a, b = before_source.get(name), after_source.get(name)
        if a.shape != b.shape:
            raise SafeneuronsError(f"mask {name!r} has shape {tuple(a.shape)} before and {tuple(b.shape)} after")
        partial[name] = OverlapCounts.of(a, b)
    drift = None
    if model_before is not None and model_after is not None:
        drift = weight_drift(model_before, model_after, before if frozen_masks is None else frozen_masks, names,
                             cache_dir)
    merged = distributed.merge_dicts_to_main(partial)
    if merged is None:
        return None
    comparison = MaskComparison(OverlapCounts(), drift=drift)
    for name in names:
        counts = merged[name]
        comparison.overall.add(counts)
        comparison.per_layer.setdefault(layer_of(name), OverlapCounts()).add(counts)
        comparison.per_module.setdefault(module_of(name), OverlapCounts()).add(counts)
    return comparison


def weight_drift(model_before: Any, model_after: Any, masks: Any, names: Iterable[str] | None = None,
                 cache_dir: str | None = None) -> DriftStats | None:
    """Mean and max absolute change of the masked (frozen) and unmasked (free) elements of the masked parameters,
    read one parameter at a time. Collective under N ranks; the result on rank 0, None elsewhere."""
    mask_reader = mask_source(masks)
    before, after = weight_source(model_before, cache_dir), weight_source(model_after, cache_dir)
    names = sorted(mask_reader.names if names is None else names, key=_natural_key)
    for name in names:
        if name not in before.names or name not in after.names:
            raise SafeneuronsError(f"mask {name!r} names no parameter of both models")
    stats = DriftStats()
    for name in _mine(names):
        a, b, mask = before.get(name), after.get(name), mask_reader.get(name)
        if not a.shape == b.shape == mask.shape:
            raise SafeneuronsError(f"parameter {name!r} has shapes {tuple(a.shape)}, {tuple(b.shape)} and mask "
                                   f"{tuple(mask.shape)}; the models and the mask must have the same layout")
        stats.add(DriftStats.of(a, b, mask))
    parts = distributed.gather_to_main(stats)
    if parts is None:
        return None
    total = DriftStats()
    for part in parts:
        total.add(part)
    return total


def plot_overlap_per_layer(comparison: MaskComparison, path: str | os.PathLike, title: str = "") -> Path:
    """Bar chart of overlap and Jaccard per decoder layer."""
    plt = pyplot()
    layers = [key for key in comparison.per_layer if key != "other"]
    positions = range(len(layers))
    overlap = [comparison.per_layer[key].overlap or 0.0 for key in layers]
    jaccard = [comparison.per_layer[key].jaccard or 0.0 for key in layers]
    figure, axis = plt.subplots(figsize=(max(6.0, 0.3 * len(layers) + 3) + 2.5, 3.5))
    axis.bar([p - 0.2 for p in positions], overlap, width=0.4, label="overlap |A∩B|/|A|")
    axis.bar([p + 0.2 for p in positions], jaccard, width=0.4, label="Jaccard |A∩B|/|A∪B|")
    axis.set_xticks(list(positions), layers)
    axis.set_xlabel("decoder layer")
    axis.set_ylabel("overlap or Jaccard index")
    axis.set_ylim(0, 1.05)
    axis.set_title(title or "safety-critical weights before vs after fine-tuning")
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # beside the bars, never over them
    figure.tight_layout()
    path = Path(path)
    save_figure(figure, path, dpi=120)
    return path


def recalculate_safety_scores(fine_tuned_model: torch.nn.Module, tokenizer: Any,
                              analyzer: Any) -> dict[str, torch.Tensor]:
    """The original extension's re-scoring: the safety-critical masks of `fine_tuned_model`, found with the method,
    data, sparsity, sample count and seed that `analyzer` (a SafetyNeuronAnalyzer) last used."""
    from safeneurons.interventions.analyzer import SafetyNeuronAnalyzer

    used = getattr(analyzer, "summary", None)
    if not used:
        raise SafeneuronsError("the analyzer has not identified safety-critical neurons yet; call "
                               "identify_safety_critical_neurons first so that the re-scoring uses the same settings")
    fresh = SafetyNeuronAnalyzer(fine_tuned_model, tokenizer, data_dir=analyzer.data_dir)
    return fresh.identify_safety_critical_neurons(prune_method=used["method"], prune_data=used["data"],
                                                  sparsity_ratio=used["sparsity_ratio"], nsamples=used["nsamples"],
                                                  seed=used["seed"])


def _metadata_near(masks: Any) -> dict:
    """Run settings from the score_summary.json beside a mask file, when there is one."""
    from safeneurons.scores.config import summary_beside

    data = None if isinstance(masks, Mapping) else summary_beside(masks)
    if data is None:
        return {}
    config = data.get("config", data)
    return {"prune_method": config.get("method"), "prune_data": config.get("data"),
            "sparsity_ratio": config.get("sparsity_ratio")}


def analysis_summary(comparison: MaskComparison, metadata: Mapping[str, Any]) -> dict:
    """analysis_summary.json: the original extension's keys first, then the new ones."""
    original_keys = ("prune_method", "prune_data", "sparsity_ratio", "training_data", "num_epochs", "learning_rate")
    body = comparison.to_json()
    head = {key: body.pop(key) for key in ("original_safety_critical_count", "new_safety_critical_count",
                                           "total_neurons")}
    return {**head, **{key: metadata.get(key) for key in original_keys},
            **{key: value for key, value in metadata.items() if key not in original_keys}, **body}


def write_comparison(comparison: MaskComparison, out: str | os.PathLike, metadata: Mapping[str, Any]) -> dict:
    """Write analysis_summary.json and the per-layer plot into `out` (rank 0 only)."""
    from safeneurons.runtime.outputs import write_json

    summary = analysis_summary(comparison, metadata)
    write_json(Path(out) / SUMMARY_FILE, summary)
    plot_overlap_per_layer(comparison, Path(out) / PLOT_FILE)
    return summary


@dataclass(frozen=True)
class CompareConfig:
    before: str  # mask file or folder (or a .pt dict) before fine-tuning
    after: str
    frozen_masks: str | None = None  # the masks that were frozen, for the weight drift (default: `before`)
    model_before: str | None = None  # both models, to measure how far the weights moved
    model_after: str | None = None
    cache_dir: str | None = None

    def validate(self) -> None:
        if (self.model_before is None) != (self.model_after is None):
            raise SafeneuronsError("give both --model-before and --model-after to measure the weight drift, or "
                                   "neither")


def run_compare(config: CompareConfig, out: str | os.PathLike) -> dict | None:
    """Collective: compare the masks (and weights) and write analysis_summary.json and the plot to `out`; the
    summary on rank 0, None elsewhere."""
    config.validate()
    check_output_dir(out)
    distributed.init_distributed()
    comparison = compare_masks(config.before, config.after, config.frozen_masks, config.model_before,
                               config.model_after, config.cache_dir)
    if comparison is None:
        return None
    return write_comparison(comparison, out, _metadata_near(config.before))
