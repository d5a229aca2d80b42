"""The entry points: `fine_tune` (full weights, frozen masks), `fine_tune_lora`, and the seed's FineTuner."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import nn

from safeneurons.data.examples import Example
from safeneurons.data.samples import build_samples, load_samples
from safeneurons.errors import SafeneuronsError
from safeneurons.evaluation.refusal_curve import make_probe
from safeneurons.finetune.backends import DeepSpeedBackend, TorchBackend
from safeneurons.finetune.config import FineTuneConfig
from safeneurons.finetune.loop import RunState, build_report, run_fine_tuning, save_model, snapshot
from safeneurons.finetune.resume import check_resume, run_settings
from safeneurons.finetune.schedule import planned_steps
from safeneurons.interventions.dynamic import DynamicFreezing, rescore_config
from safeneurons.interventions.freezing import FROZEN_ATTRIBUTE, FrozenWeights, freeze
from safeneurons.runtime import distributed
from safeneurons.runtime.dsconfig import zero_stage
from safeneurons.runtime.timing import Stopwatch
from safeneurons.runtime.tracking import Tracker, open_tracker

if TYPE_CHECKING:
    from safeneurons.data.examples import Sample
    from safeneurons.evaluation.refusal_curve import RefusalProbe
    from safeneurons.finetune.backends import TrainingBackend
    from safeneurons.finetune.config import FineTuneResult
    from safeneurons.masks.source import MaskSource
    from safeneurons.scores.config import ScoreConfig

log = logging.getLogger(__name__)


def _fill_ds_config(config: FineTuneConfig, model_name: str, world: int) -> dict:
    from transformers import AutoConfig

    from safeneurons.models.loading import parse_dtype, resolve_model_name
    from safeneurons.runtime.dsconfig import fill_config

    hidden = getattr(AutoConfig.from_pretrained(resolve_model_name(model_name, config.cache_dir), cache_dir=config.cache_dir),
                     "hidden_size", None)
    filled = fill_config(config.deepspeed, micro_batch_size=config.batch_size,
                       gradient_accumulation_steps=config.gradient_accumulation_steps, world_size=world,
                       learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                       gradient_clipping=config.max_grad_norm, dtype=parse_dtype(config.dtype), hidden_size=hidden)
    if "scheduler" in filled and (config.lr_scheduler != "constant" or config.warmup_steps or config.warmup_ratio):
        raise SafeneuronsError(f"the DeepSpeed config {config.deepspeed} has its own \"scheduler\": remove it to use "
                               f"--lr-scheduler/--warmup-*")
    return filled


def prepare_model(model: nn.Module, config: FineTuneConfig) -> None:
    """Switch on what the config asks of the model itself before training (activation checkpointing)."""
    if config.gradient_checkpointing:
        # non-reentrant: gradients reach the weights also when a layer's inputs need none (frozen embeddings, LoRA)
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False


def fine_tune(model_name_or_dir: str, masks_path: MaskSource | None, config: FineTuneConfig) -> FineTuneResult:
    """Fine-tune a model with the masked weights frozen; collective. Writes the HF folder and freeze_report.json
    (rank 0) to `config.save_path` and returns the report on every rank."""
    from safeneurons.models.loading import load_model, load_tokenizer

    score_config = check_before_loading(model_name_or_dir, masks_path, config)
    context = distributed.init_distributed(require_process_group=config.deepspeed is not None)
    if context.world_size > 1 and config.deepspeed is None:
        raise SafeneuronsError(f"{context.world_size} ranks need --deepspeed CONFIG (ZeRO stage 0-3); the plain "
                               f"torch loop is single-process")
    settings = run_settings(config, masks_path)
    if config.resume:
        check_resume(Path(config.checkpoint_dir), settings, config.resume_override)
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(model_name_or_dir, config.cache_dir)
    samples = load_samples(config.data, tokenizer, config.nsamples, config.seed, config.max_length, config.data_dir,
                           config.add_eos)
    safety = load_samples(config.safety_data, tokenizer, None, config.seed, config.max_length, config.data_dir,
                          config.add_eos) if config.safety_data else None
    probe = make_probe(config.eval_every, config.eval_prompts, config.eval_limit, config.eval_max_new_tokens,
                       tokenizer, config.data_dir)
    ds_config = _fill_ds_config(config, model_name_or_dir, context.world_size) if config.deepspeed else None
    model = load_model(model_name_or_dir, config.dtype, config.cache_dir,
                       None if ds_config else context.device, ds_config)
    prepare_model(model, config)
    tracker = open_tracker(config.tracking, dataclasses.asdict(config))
    try:
        if config.lora_r:
            report, model = fine_tune_lora(model, masks_path, samples, safety, tokenizer.pad_token_id, config,
                                           ds_config, context, settings, probe, tracker)
        else:
            frozen = freeze(model, masks_path, config.freeze_strength) if masks_path is not None else None
            report, model = _train_full(model, frozen, tokenizer, samples, safety, probe, score_config, ds_config,
                                        settings, context, config, tracker)
    finally:
        tracker.close()
    save_model(model, tokenizer, report, config.save_path)
    return _logged(report, config)


def check_before_loading(model_name_or_dir: str, masks_path: MaskSource | None,
                         config: FineTuneConfig) -> ScoreConfig | None:
    """Every check that needs no weights, so that bad input fails before any is read; returns the re-scoring
    config of dynamic freezing (None without it)."""
    from safeneurons.data.readers import check_sources
    from safeneurons.masks.io import MaskReader, check_mask_file_fits
    from safeneurons.runtime.outputs import check_output_dir

    config.validate()
    config.check_needs_masks(masks_path is not None)
    if not config.save_path:
        raise SafeneuronsError("save_path is required: the folder for the fine-tuned model")
    check_output_dir(config.save_path)
    if isinstance(masks_path, (str, Path)):
        MaskReader(masks_path).verify()  # a damaged mask file fails here, not after the model has loaded
        check_mask_file_fits(masks_path, model_name_or_dir, config.cache_dir)  # and another model's
    check_sources(config.data, config.safety_data, config.eval_prompts if config.eval_every else None,
                  directory=config.data_dir)
    score_config = rescore_config(masks_path, config.data_dir) if config.rescore_every else None
    if score_config is not None:
        check_sources(score_config.data, score_config.utility_data, directory=config.data_dir)
    if config.lora_r:
        from safeneurons.finetune.lora import check_targets
        from safeneurons.models.loading import model_skeleton

        check_targets(model_skeleton(model_name_or_dir, config.cache_dir), config.lora_targets)
    return score_config


def _train_full(model: nn.Module, frozen: FrozenWeights | None, tokenizer: Any, samples: Sequence[Sample],
                safety: Sequence[Sample] | None, probe: RefusalProbe | None, score_config: ScoreConfig | None,
                ds_config: dict | None, settings: Mapping[str, Any], context: Any,
                config: FineTuneConfig, tracker: Tracker) -> tuple[FineTuneResult, nn.Module]:
    """Full-weight training with the HF Trainer or our loop; returns the report and the trained module."""
    if config.engine == "trainer":
        from safeneurons.finetune.trainer import train_with_trainer
        report = train_with_trainer(model, frozen, samples, tokenizer.pad_token_id, config, ds_config, settings,
                                    zero_stage(ds_config) if ds_config else None, tracker)
        return report, model
    backend = make_backend(model, ds_config, config, len(samples), context.world_size)
    dynamic = None if score_config is None else DynamicFreezing(
        frozen, backend.module, tokenizer, score_config, config.rescore_every, config.rescore_mode, context.device)
    report = run_fine_tuning(backend, frozen, samples, tokenizer.pad_token_id, config, context.device, settings,
                             safety, dynamic, probe, tracker)
    return report, backend.module


def make_backend(model: nn.Module, ds_config: dict | None, config: FineTuneConfig, n_samples: int,
                 world: int) -> TrainingBackend:
    """The DeepSpeed engine loop under a DeepSpeed config, else the plain loop; the schedule spans the plan."""
    total_steps = planned_steps(n_samples, config, world)
    if ds_config and config.lisa_steps is not None and zero_stage(ds_config) != 3:
        raise SafeneuronsError(f"--lisa-steps adds its proximal gradient to the plain loop's or ZeRO-3's gradient "
                               f"partitions; the DeepSpeed config is ZeRO-{zero_stage(ds_config)}")
    return DeepSpeedBackend(model, ds_config, config, total_steps) if ds_config else \
        TorchBackend(model, config, total_steps)


def _logged(report: FineTuneResult, config: FineTuneConfig) -> FineTuneResult:
    if distributed.is_main():
        log.info("fine-tuned %d steps: %d frozen elements, max |change| frozen %.3g, free %.3g; saved to %s",
                 report.steps, report.frozen_count, report.max_abs_change_frozen, report.max_abs_change_free,
                 config.save_path)
    return report


def fine_tune_lora(model: nn.Module, masks: MaskSource | None, samples: Sequence[Sample],
                   safety: Sequence[Sample] | None, pad_token_id: int, config: FineTuneConfig, ds_config: dict | None,
                   context: distributed.DistContext, settings: Mapping[str, Any], probe: RefusalProbe | None = None,
                   tracker: Tracker | None = None) -> tuple[FineTuneResult, nn.Module]:
    """LoRA on the base model (protected by `masks` when given, see lora.py), trained by the same loop, merged
    into the base weights; the report measures the merged model against the original (masked elements: 0)."""
    from safeneurons.finetune.lora import add_adapters, merge_adapters

    started = Stopwatch()
    protected = freeze(model, masks) if masks is not None else None  # never attached: it measures
    start = snapshot(model)
    adapted = add_adapters(model, config.lora_r, config.lora_alpha, config.lora_targets, masks)
    backend = make_backend(adapted, ds_config, config, len(samples), context.world_size)
    trained = run_fine_tuning(backend, None, samples, pad_token_id, config, context.device, settings, safety,
                              probe=probe, tracker=tracker)
    merged = merge_adapters(backend.module)
    state = RunState(trained.steps, trained.loss_curve, trained.learning_rates, trained.safety_loss_curve,
                     trained.refusal_curve)
    partitioned = protected.partitioned if protected is not None else backend.zero_stage == 3
    report = build_report(merged, start, protected, partitioned, state, backend.zero_stage, config, settings, started,
                          trained.resumed_from_step, trained.resumed_settings)
    return report, merged


class FineTuner:
    """The original extension's API: in-process fine-tuning of a loaded model, optionally with frozen weights
    (`masks`: name -> bool tensor or a mask file, or a `FrozenWeights` from `freeze`; by default the freezing that
    `SafetyNeuronAnalyzer.freeze_safety_critical_neurons` attached to the model)."""

    def __init__(self, model: nn.Module, tokenizer: Any, masks: MaskSource | FrozenWeights | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        if masks is None:
            self.frozen = getattr(model, FROZEN_ATTRIBUTE, None)
        else:
            self.frozen = masks if isinstance(masks, FrozenWeights) else freeze(model, masks)
        self.report: FineTuneResult | None = None

    def fine_tune_model(self, training_data: str | Sequence[Example | Mapping[str, str]] = "alpaca_cleaned_no_safety",
                        num_epochs: int = 3, learning_rate: float = 2e-5, batch_size: int = 4, max_length: int = 512,
                        save_path: str | None = None, **options: Any) -> nn.Module:
        """Train in this process (plain AdamW loop) and return the fine-tuned model (the same object), its
        `FineTuneResult` as `model.fine_tune_report` and `self.report`; `options` are further FineTuneConfig fields.
        Writes the HF folder and freeze_report.json to `save_path` when given."""
        config = FineTuneConfig(data=training_data if isinstance(training_data, str) else "<in-memory>",
                                save_path=save_path or "", num_epochs=num_epochs, learning_rate=learning_rate,
                                batch_size=batch_size, max_length=max_length, **options)
        config.validate()
        config.check_needs_masks(self.frozen is not None)
        if self.frozen is not None:
            self.frozen.strength = config.freeze_strength
        samples = self._samples(training_data, config, config.nsamples)
        safety = self._samples(config.safety_data, config, None) if config.safety_data else None
        prepare_model(self.model, config)
        backend = TorchBackend(self.model, config, planned_steps(len(samples), config, 1))
        device = next(self.model.parameters()).device
        tracker = open_tracker(config.tracking, dataclasses.asdict(config))
        try:
            report = run_fine_tuning(backend, self.frozen, samples, self.tokenizer.pad_token_id, config, device,
                                     safety=safety, tracker=tracker)
        finally:
            tracker.close()
        if save_path:
            save_model(self.model, self.tokenizer, report, save_path)
        self.report = self.model.fine_tune_report = report
        return self.model

    def _samples(self, training_data: str | Sequence[Example | Mapping[str, str]], config: FineTuneConfig,
                 nsamples: int | None) -> list[Sample]:
        if isinstance(training_data, str):
            return load_samples(training_data, self.tokenizer, nsamples, config.seed, config.max_length,
                                config.data_dir, config.add_eos)
        examples = [item if isinstance(item, Example) else Example(item["prompt"], item["response"])
                    for item in training_data]
        return build_samples(examples, self.tokenizer, nsamples, config.seed, config.max_length, config.add_eos)
