"""`patch` as one call: a sweep of patched sites between two prompts, or the refusal direction of two prompt sets,
each written to its results folder (staged, published with one rename) by rank 0."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from safeneurons.data.examples import as_example
from safeneurons.data.readers import check_sources
from safeneurons.data.samples import load_prompts, prompt_text
from safeneurons.errors import SafeneuronsError
from safeneurons.interp.patching.direction import RefusalDirection, compute_refusal_direction, load_direction
from safeneurons.interp.patching.metrics import Metric, metric_named
from safeneurons.interp.patching.patcher import ActivationPatcher
from safeneurons.interp.patching.report import format_attribution_check, format_report, plot_heatmap
from safeneurons.interp.patching.sites import (COMPONENTS, DEFAULT_SIGNIFICANCE, DIRECTION_FILE, METHODS, METRICS,
                                               MODES, REFUSAL_STARTS, ActivationPatchingResult, Position,
                                               finite_or_none)
from safeneurons.masks.neurons import NeuronSets, resolve_neurons
from safeneurons.models.blocks import load_source
from safeneurons.models.loading import ModelSource, load_config
from safeneurons.models.structure import check_same_config, check_same_tokenizer
from safeneurons.runtime import distributed
from safeneurons.runtime.outputs import check_output_dir, staged, write_json

EACH = "each"  # a position meaning one site per token of the base prompt


@dataclass(frozen=True)
class PatchConfig:
    clean: str  # the clean prompt (the base run of interchange), e.g. a harmful request
    corrupted: str  # the corrupted prompt (the source of interchange), e.g. a harmless one
    raw: bool = False  # tokenise the prompts as given, without the chat format
    mode: str = "noising"
    method: str = "exact"
    components: tuple[str, ...] = ("residual",)
    layers: tuple[int, ...] | None = None  # None: every layer
    positions: tuple[Position, ...] = ("last",)  # "last", "all", "each" (one site per token) or token indexes
    metric: str = "refusal"
    tokens: tuple[str, str] | None = None  # logit_diff: logit(A) − logit(B)
    direction: str | None = None  # the direction metric's file
    refusal_starts: tuple[str, ...] = REFUSAL_STARTS
    batch_size: int | None = None  # patched runs per forward (None: as many as fit a memory bound)
    top: int = 15  # sites listed in the report (and checked exactly with attribution)
    significance_threshold: float = DEFAULT_SIGNIFICANCE
    neurons: tuple[str, ...] = ()  # mlp_neuron: LAYER:INDEXES items, or one `score` mask file
    neuron_rule: str = "rows"  # how a mask file names neurons (masks.neurons.MASK_RULE_HELP)
    source_model: str | None = None  # cross-model: the source run is this model's (same structure and tokenizer)

    def validate(self) -> None:
        if ("mlp_neuron" in self.components) != bool(self.neurons):
            raise SafeneuronsError("--neurons (LAYER:INDEXES items or a neuron mask file) goes with --components "
                                   "mlp_neuron, and mlp_neuron needs it")
        for name in ("clean", "corrupted"):
            if not getattr(self, name).strip():
                raise SafeneuronsError(f"the {name} prompt is empty")
        for value, allowed, option in ((self.mode, MODES, "--mode"), (self.method, METHODS, "--patch-method"),
                                       (self.metric, METRICS, "--metric")):
            if value not in allowed:
                raise SafeneuronsError(f"{option} {value!r} is not one of {', '.join(allowed)}")
        unknown = [component for component in self.components if component not in COMPONENTS]
        if unknown or not self.components:
            raise SafeneuronsError(f"--components {','.join(self.components)!r}: expected a comma list of "
                                   f"{', '.join(COMPONENTS)}")
        if self.metric == "logit_diff" and not self.tokens:
            raise SafeneuronsError("--metric logit_diff needs --tokens A B (two one-token texts)")
        if self.metric == "direction" and not self.direction:
            raise SafeneuronsError("--metric direction needs --direction FILE (from `safeneurons patch "
                                   "--compute-direction`)")

        if self.batch_size is not None and self.batch_size < 1:
            raise SafeneuronsError(f"--batch-size {self.batch_size} must be a positive integer")
        if self.top < 1:
            raise SafeneuronsError(f"--top {self.top} must be a positive integer")
        if not self.significance_threshold >= 0:
            raise SafeneuronsError(f"--significance-threshold {self.significance_threshold} must be >= 0")

    def check_inputs(self, hidden_size: int | None = None) -> None:
        """The files the sweep reads exist, and a direction fits the model (checked before any model loads)."""
        if self.metric == "direction" and not Path(self.direction).is_file():
            raise SafeneuronsError(f"--direction {self.direction} does not exist (a refusal direction file from "
                                   f"`safeneurons direction` or `safeneurons patch --compute-direction`)")
        if self.metric == "direction" and hidden_size is not None:
            size = load_direction(self.direction).numel()
            if size != hidden_size:
                raise SafeneuronsError(f"the refusal direction {self.direction} has {size} entries; the model's "
                                       f"hidden size is {hidden_size}: it comes from another model")

    def neuron_sets(self, model_config: Any) -> NeuronSets | None:
        """The neurons to patch per layer, checked against the model's config (before any weight loads)."""
        return resolve_neurons(self.neurons, model_config, self.neuron_rule) if self.neurons else None

    def prompt(self, name: str, tokenizer: Any) -> str:
        text = getattr(self, name)
        return text if self.raw else prompt_text(tokenizer, as_example(text))

    def metric_for(self, tokenizer: Any) -> Metric:
        return metric_named(self.metric, tokenizer, self.tokens, self.direction, self.refusal_starts)

    def site_positions(self, length: int) -> list[Position]:
        return [expanded for position in self.positions
                for expanded in (range(length) if position == EACH else [position])]


@dataclass(frozen=True)
class DirectionConfig:
    harmful: str = "demo-harmful"
    harmless: str = "demo-harmless"
    n_prompts: int = 64  # of each set
    layer: int | None = None  # whose output is averaged (None: the last, the final residual)
    data_dir: str | None = None

    def validate(self) -> None:
        if self.n_prompts < 1:
            raise SafeneuronsError(f"--n-prompts {self.n_prompts} must be a positive integer")


def check_layers(layers: Sequence[int] | None, n_layers: int) -> None:
    """Layer indexes must exist in the model (read from its config, before any weight)."""
    bad = [layer for layer in layers or () if not 0 <= layer < n_layers]
    if bad:
        raise SafeneuronsError(f"--layers {bad[0]} does not exist; the model has layers 0..{n_layers - 1}")


def publish_files(out: str | Path, files: dict[str, Callable[[Path], None]]) -> None:
    """Rank 0 writes every file into the staging folder, then moves them into `out` together."""
    with staged(out) as staging:
        for name, write in files.items():
            write(staging / name)


def run_patch(model: ModelSource, config: PatchConfig, out: str | Path) -> ActivationPatchingResult | None:
    """Collective: the sweep's effects, written to `out` (patching.json, patching.png, report.txt) with the report
    printed; the result on rank 0, None elsewhere."""
    config.validate()
    model_config = load_config(model.name, model.cache_dir)
    config.check_inputs(model_config.hidden_size)
    check_output_dir(out)
    check_layers(config.layers, model_config.num_hidden_layers)
    neurons = config.neuron_sets(model_config)
    model.check()
    source = None if config.source_model is None else ModelSource(config.source_model, model.dtype, model.deepspeed,
                                                                  model.cache_dir, model.shard, model.stages)
    if source is not None:
        check_same_config(model_config, load_config(source.name, source.cache_dir),
                          (f"--model {model.name}", f"--source-model {source.name}"))
    context = distributed.init_distributed(require_process_group=model.deepspeed is not None or model.shard != "none")
    loaded = load_source(model, context.device)
    tokenizer = loaded.tokenizer
    source_loaded = None if source is None else load_source(source, context.device)
    if source_loaded is not None:
        check_same_tokenizer(tokenizer, source_loaded.tokenizer, model.name, source.name)
    clean = tokenizer(config.prompt("clean", tokenizer), return_tensors="pt")["input_ids"]
    corrupted = tokenizer(config.prompt("corrupted", tokenizer), return_tensors="pt")["input_ids"]
    base = corrupted if config.mode == "denoising" else clean
    metric = config.metric_for(tokenizer)
    patcher = ActivationPatcher(config.significance_threshold, model=loaded.model, tokenizer=tokenizer, metric=metric,
                                batch_size=config.batch_size)
    sites = patcher.sites(config.components, config.layers, config.site_positions(base.shape[1]), neurons)
    result = patcher.patch(clean, corrupted, sites, config.mode, config.method,
                           source_model=None if source_loaded is None else source_loaded.model)
    check = attribution_check(patcher, loaded.model, clean, corrupted, result, config.top) \
        if config.method == "attribution" else []
    if not distributed.is_main():
        return None
    labels = [tokenizer.decode([token]) for token in base[0].tolist()]
    report = format_report(result, config.top, labels) + (format_attribution_check(check) if check else "")
    payload = {**result.to_dict(), "model": model.name, "source_model": config.source_model or model.name,
               "metric_detail": metric.detail,
               "base_tokens": labels, "world_size": distributed.world_size()}
    if check:
        payload["exact_check"] = check
    publish_files(out, {"patching.json": lambda path: write_json(path, payload),
                        "patching.png": lambda path: plot_heatmap(result, path, labels),
                        "report.txt": lambda path: path.write_text(report + "\n")})
    print(report)
    print(f"-> {out}/patching.json, patching.png, report.txt")
    return result


def run_direction(model: ModelSource, config: DirectionConfig, out: str | Path) -> RefusalDirection | None:
    """Collective: the refusal direction (refusal_direction.pt and .json in `out`); on rank 0, None elsewhere."""
    config.validate()
    check_output_dir(out)
    check_sources(config.harmful, config.harmless, directory=config.data_dir)
    context = distributed.init_distributed(require_process_group=model.deepspeed is not None)
    loaded = model.load(context.device)
    harmful = load_prompts(config.harmful, loaded.tokenizer, config.n_prompts, config.data_dir)
    harmless = load_prompts(config.harmless, loaded.tokenizer, config.n_prompts, config.data_dir)
    found = compute_refusal_direction(loaded.model, loaded.tokenizer, harmful, harmless, config.layer)
    if not distributed.is_main():
        return None
    summary = {**found.summary(), "model": model.name, "harmful": config.harmful, "harmless": config.harmless}

    def save_tensor(path: Path) -> None:
        torch.save({"direction": found.direction.contiguous(), "layer": found.layer}, path)

    publish_files(out, {DIRECTION_FILE: save_tensor, "refusal_direction.json": lambda path: write_json(path, summary)})
    print(f"refusal direction at layer {found.layer}: norm {summary['norm']:.4f}; mean projection harmful "
          f"{found.harmful_projection:.4f}, harmless {found.harmless_projection:.4f} -> {out}/{DIRECTION_FILE}")
    return found


def attribution_check(patcher: ActivationPatcher, model: nn.Module, clean: torch.Tensor, corrupted: torch.Tensor,
                      estimate: ActivationPatchingResult, k: int) -> list[dict[str, Any]]:
    """The exact effects of the `k` sites that attribution ranks highest (one batched pass), beside the estimates,
    so that a user sees how far the first-order estimate is off."""
    chosen = estimate.top(k)
    if not chosen:
        return []
    exact = patcher.patch_sweep(model, clean, corrupted, [effect.site for effect in chosen], mode=estimate.mode)
    return [{**guess.site.to_dict(), "attribution_effect": finite_or_none(guess.effect),
             "exact_effect": finite_or_none(truth.effect)} for guess, truth in zip(chosen, exact.effects)]
