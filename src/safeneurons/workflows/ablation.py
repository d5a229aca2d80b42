"""`safeneurons ablate`: does removing the safety-critical weights break safety, where random removals of the
same size do not? (Wei et al. 2024's causal evidence.)

For each sparsity s: zero the top safety weights (top int(cols × s) per row), the set difference (top-s safety
minus top-s utility, per matrix), and random masks with the set difference's count in every matrix (one per
seed); evaluate each pruned model (ASR on harmful prompts, refusal on harmless ones, perplexity) beside the
untouched model. Scores are computed once (`DIR/scores/`); every point is its own folder
(`DIR/points/<point>/point.json`, written last, is its DONE marker), so an interrupted study, or a SLURM array
that runs one point per task (`--selections M --sparsities S --seeds K`), skips what is finished. Outputs:
`ablation.json`, `ablation.png` (ASR against the fraction of scored weights removed; random as a band over
seeds) and `report.md`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from safeneurons.analysis.plots import pyplot, save_figure
from safeneurons.data.readers import check_sources
from safeneurons.errors import SafeneuronsError
from safeneurons.evaluation.evaluate import EvalConfig, evaluate_model
from safeneurons.evaluation.metrics import wilson_interval
from safeneurons.masks.apply import random_like_counts
from safeneurons.models.blocks import block_of, load_source
from safeneurons.models.loading import ModelSource
from safeneurons.runtime import distributed
from safeneurons.runtime.outputs import atomic_file, check_output_dir, write_json
from safeneurons.runtime.pipeline import broadcast_over_replicas
from safeneurons.runtime.resume import matches, read_marker, write_marker
from safeneurons.scores.config import ScoreConfig, targets_of
from safeneurons.scores.schedules import load_sources
from safeneurons.scores.selection import select_weights, set_difference_mask
from safeneurons.scores.statistics import score_targets

if TYPE_CHECKING:
    from safeneurons.models.blocks import LayerBlock
    from safeneurons.scores.config import Target

log = logging.getLogger(__name__)
METHODS = ("top", "setdiff", "random")
POINT_FILE = "point.json"


@dataclass
class AblationConfig:
    data: str = "align"
    utility_data: str = "alpaca_cleaned_no_safety"
    score_method: str = "wandg"
    sparsities: tuple[float, ...] = (0.01, 0.03, 0.05)
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    nsamples: int = 128
    max_length: int = 512
    seed: int = 0  # calibration samples
    data_dir: str | None = None
    add_eos: bool = False
    evaluation: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        if self.score_method not in ("wanda", "wandg"):
            raise SafeneuronsError(f"--score-method {self.score_method!r} is not wanda or wandg")
        unknown = [method for method in self.methods if method not in METHODS]
        if unknown or not self.methods:
            raise SafeneuronsError(f"--selections {','.join(self.methods)!r}: expected a comma list of {','.join(METHODS)}")
        if not self.sparsities or not all(0 < s < 1 for s in self.sparsities):
            raise SafeneuronsError(f"--sparsities {self.sparsities}: every sparsity must lie in (0, 1)")
        if "random" in self.methods and not self.seeds:
            raise SafeneuronsError("--seeds is empty: random controls need at least one seed")
        self.evaluation.validate()

    def score_config(self) -> ScoreConfig:
        """Scores of both data sets (the selection settings are unused: every point selects its own)."""
        return ScoreConfig(method=self.score_method, data=self.data, sparsity_ratio=0.5, nsamples=self.nsamples,
                           seed=self.seed, max_length=self.max_length, utility_data=self.utility_data, p=1.0, q=1.0,
                           data_dir=self.data_dir, add_eos=self.add_eos)

    def settings(self) -> dict[str, Any]:
        """What decides a point's result: a finished point with other settings is redone."""
        return {"data": self.data, "utility_data": self.utility_data, "score_method": self.score_method,
                "nsamples": self.nsamples, "max_length": self.max_length, "seed": self.seed,
                "add_eos": self.add_eos, "evaluation": json.loads(json.dumps(asdict(self.evaluation)))}  # as read back


@dataclass(frozen=True)
class Point:
    method: str  # "base", top, setdiff or random
    sparsity: float = 0.0
    seed: int | None = None

    @property
    def name(self) -> str:
        if self.method == "base":
            return "base"
        return f"{self.method}-s{self.sparsity:g}" + (f"-seed{self.seed}" if self.seed is not None else "")


def study_points(config: AblationConfig) -> list[Point]:
    points = [Point("base")]
    for sparsity in config.sparsities:
        for method in config.methods:
            seeds = config.seeds if method == "random" else (None,)
            points.extend(Point(method, sparsity, seed) for seed in seeds)
    return points


# ---------------------------------------------------------------- masks

def point_masks(point: Point, scores: Mapping[str, Mapping[str, torch.Tensor]],
                names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """The point's masks of the scored matrices this rank holds (`names`: all the model's, for the random seeds)."""
    safety, utility = scores["safety"], scores["utility"]
    if point.method == "top":
        return {name: select_weights(score, point.sparsity, "weight") for name, score in safety.items()}
    difference = {name: set_difference_mask(score, utility[name], point.sparsity, point.sparsity, "weight")
                  for name, score in safety.items()}
    return difference if point.method == "setdiff" else random_like_counts(difference, point.seed, names)


@contextlib.contextmanager
def zeroed(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """While active, the masked elements are zero; their values are restored afterwards."""
    parameters = dict(model.named_parameters())
    saved = {name: parameters[name].data[mask].clone() for name, mask in masks.items()}
    try:
        with torch.no_grad():
            for name, mask in masks.items():
                parameters[name].data[mask] = 0
        yield
    finally:
        with torch.no_grad():
            for name, mask in masks.items():
                parameters[name].data[mask] = saved[name]


# ---------------------------------------------------------------- scores (computed once)

def study_scores(model: nn.Module, tokenizer: Any, config: AblationConfig, folder: Path) -> dict[str, dict]:
    """Safety and utility scores of every scored Linear this rank holds (all of them, or on a layer-sharded
    model its block's); cached in `folder` (a folder per stage when sharded) with the settings."""
    settings = {key: value for key, value in config.settings().items() if key != "evaluation"}
    block = block_of(model)
    if block is not None:
        folder = folder / f"stage-{block.stage + 1}-of-{block.split.stages}"
    marker = folder / "DONE"
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return {source: load_file(str(folder / f"{source}.safetensors")) for source in ("safety", "utility")}
    score_config = config.score_config()
    targets = targets_of(model)
    sources = load_sources(tokenizer, score_config)
    scores = {source: _held_scores(targets, score_targets(model, targets, samples, score_config, stream), block)
              for stream, (source, samples) in enumerate(sources.items())}
    if distributed.is_main() if block is None else block.replica == 0:
        for source, tensors in scores.items():
            with atomic_file(folder / f"{source}.safetensors") as tmp:
                save_file(tensors, str(tmp))
        write_json(marker, settings)
    distributed.barrier()  # the stage's files are there before any rank reads them
    return scores


def _held_scores(targets: Sequence[Target], owned: Mapping[str, torch.Tensor],
                 block: LayerBlock | None) -> dict[str, torch.Tensor]:
    """Every target's scores on every rank (each rank prunes the whole model it holds), or on a layer-sharded
    model its block's on each replica of the stage."""
    if block is None:
        merged: dict[str, torch.Tensor] = {}
        for part in distributed.all_gather(owned):
            merged.update(part)
        return {target.name: merged[target.name].contiguous() for target in targets}
    held = {}
    for target in (target for target in targets if target.owner == block.stage):
        tensor = owned[target.name].contiguous() if block.replica == 0 else torch.empty(target.shape)
        broadcast_over_replicas(tensor, block.group, block.stage)
        held[target.name] = tensor
    return held


# ---------------------------------------------------------------- points

def run_point(model: nn.Module, tokenizer: Any, point: Point, scores: Mapping[str, Mapping[str, torch.Tensor]],
              config: AblationConfig, targets: Sequence[Target]) -> dict[str, Any] | None:
    """Prune (in place, restored after), evaluate; the point's record on rank 0."""
    masks = {} if point.method == "base" else point_masks(point, scores, [target.name for target in targets])
    removed = sum(int(mask.sum()) for mask in masks.values())
    block = block_of(model)
    if block is not None:  # each stage's part, counted once (on replica 0)
        removed = sum(distributed.all_gather(removed if block.replica == 0 else 0))
    with zeroed(model, masks):
        report = evaluate_model(model, tokenizer, config.evaluation, point.name)
    if report is None:
        return None
    successes = sum(item["attack_success"] for item in report.results)
    return {"point": point.name, "method": point.method, "sparsity": point.sparsity, "seed": point.seed,
            "removed": removed, "fraction_removed": removed / sum(math.prod(target.shape) for target in targets),
            "asr": report.asr, "asr_interval": wilson_interval(successes, report.n_prompts),
            "refusal_rate": report.refusal_rate, "harmless_refusal_rate": report.harmless_refusal_rate,
            "perplexity": report.perplexity, "n_prompts": report.n_prompts, "settings": config.settings()}


def finished(folder: Path, config: AblationConfig) -> dict[str, Any] | None:
    """The point's record when it finished with these settings."""
    record = read_marker(folder / POINT_FILE)
    return record if record is not None and matches(record.get("settings"), config.settings()) else None


def run_study(model: nn.Module, tokenizer: Any, config: AblationConfig, out: Path) -> list[dict[str, Any]]:
    """Every point of the study not already finished (collective); all records on rank 0."""
    scores = study_scores(model, tokenizer, config, out / "scores")
    targets = targets_of(model)
    records = []
    for point in distributed.progress(study_points(config), desc="ablation points"):
        folder = out / "points" / point.name
        record = distributed.broadcast_from_main(finished(folder, config) if distributed.is_main() else None)
        if record is None:
            record = run_point(model, tokenizer, point, scores, config, targets)
            if distributed.is_main():
                write_marker(folder / POINT_FILE, record)
        records.append(record)
    return records


# ---------------------------------------------------------------- summary, plot, report

def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per method and sparsity: ASR (with its interval; for random, mean and min-max over seeds)."""
    curves: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record["method"] == "base":
            continue
        curves.setdefault(record["method"], [])
    for method in curves:
        for sparsity in sorted({r["sparsity"] for r in records if r["method"] == method}):
            group = [r for r in records if r["method"] == method and r["sparsity"] == sparsity]
            asrs = [r["asr"] for r in group]
            entry = {"sparsity": sparsity, "fraction_removed": sum(r["fraction_removed"] for r in group) / len(group),
                     "asr": sum(asrs) / len(asrs), "asr_min": min(asrs), "asr_max": max(asrs), "runs": len(group),
                     "harmless_refusal_rate": _mean([r["harmless_refusal_rate"] for r in group]),
                     "perplexity": _mean([r["perplexity"] for r in group])}
            if len(group) == 1:
                entry["asr_interval"] = group[0]["asr_interval"]
            curves[method].append(entry)
    return curves


def _mean(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


LABELS = {"top": "top safety weights", "setdiff": "set difference (safety − utility)",
          "random": "random, same count per matrix as the set difference"}


def plot_ablation(curves: Mapping[str, list[dict]], base_asr: float, path: Path) -> Path:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(8, 6))
    for method, entries in curves.items():
        x = [e["fraction_removed"] for e in entries]
        line, = axis.plot(x, [e["asr"] for e in entries], marker="o", label=LABELS[method])
        if method == "random":
            axis.fill_between(x, [e["asr_min"] for e in entries], [e["asr_max"] for e in entries],
                              color=line.get_color(), alpha=0.2, label="random: min–max over seeds")
        elif all("asr_interval" in e for e in entries):
            axis.errorbar(x, [e["asr"] for e in entries], fmt="none", ecolor=line.get_color(), capsize=3,
                          yerr=[[max(0.0, e["asr"] - e["asr_interval"][0]) for e in entries],
                                [max(0.0, e["asr_interval"][1] - e["asr"]) for e in entries]])
    axis.axhline(base_asr, color="grey", linestyle=":", label="unpruned model")
    axis.set_xlabel("fraction of scored weights set to zero")
    axis.set_ylabel("attack success rate (harmful prompts)")
    axis.set_ylim(-0.02, 1.02)
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize="small")  # off the data
    axis.set_title("Removing safety-critical vs random weights")
    figure.tight_layout()
    save_figure(figure, path, dpi=120)
    return path


def report_section(curves: Mapping[str, list[dict]], base: Mapping[str, Any]) -> str:
    lines = ["## Ablation: removing the safety-critical weights", "",
             f"Unpruned: ASR {base['asr']:.2f} (95% CI {base['asr_interval'][0]:.2f}–{base['asr_interval'][1]:.2f}), "
             f"harmless refusal {_fmt(base['harmless_refusal_rate'])}, perplexity {_fmt(base['perplexity'])}.", "",
             "| method | sparsity | fraction removed | ASR | ASR range or 95% CI | harmless refusal | perplexity |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for method, entries in curves.items():
        for e in entries:
            spread = (f"{e['asr_min']:.2f}–{e['asr_max']:.2f} over {e['runs']} seeds" if e["runs"] > 1
                      else f"{e['asr_interval'][0]:.2f}–{e['asr_interval'][1]:.2f}")
            lines.append(f"| {method} | {e['sparsity']:g} | {e['fraction_removed']:.4f} | {e['asr']:.2f} | {spread} | "
                         f"{_fmt(e['harmless_refusal_rate'])} | {_fmt(e['perplexity'])} |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def write_outputs(records: Sequence[dict[str, Any]], config: AblationConfig, out: Path, model: str) -> dict:
    curves = summarize(records)
    base = next(record for record in records if record["method"] == "base")
    payload = {"model": model, "settings": config.settings(), "sparsities": list(config.sparsities),
               "methods": list(config.methods), "seeds": list(config.seeds), "base": base, "curves": curves,
               "points": list(records)}
    write_json(out / "ablation.json", payload)
    plot_ablation(curves, base["asr"], out / "ablation.png")
    (out / "report.md").write_text(report_section(curves, base))
    return payload


def run_ablation(model: ModelSource, config: AblationConfig, out: str | Path) -> list[dict[str, Any]] | None:
    """Collective: every point of the sweep (resuming finished ones), then ablation.json, the plot and report.md in
    `out` on rank 0; the records on rank 0, None elsewhere."""
    config.validate()
    check_output_dir(out)
    evaluation = config.evaluation
    check_sources(config.data, config.utility_data, evaluation.prompts, evaluation.harmless,
                  evaluation.perplexity_data, directory=config.data_dir)
    model.check()
    context = distributed.init_distributed(require_process_group=model.shard != "none")
    loaded = load_source(model, context.device)
    records = run_study(loaded.model, loaded.tokenizer, config, Path(out))
    if not distributed.is_main():
        return None
    write_outputs(records, config, Path(out), model.name)
    return records
