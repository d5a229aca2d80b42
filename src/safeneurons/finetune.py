"""`safeneurons finetune`: fine-tuning with the safety-critical weights frozen, bit for bit.

Two training loops share one schedule and one report: a plain torch loop (single process, AdamW) and a DeepSpeed
engine loop (ZeRO stages 0-3, any launcher). The frozen weights (`freezing.freeze`) are attached to the
optimizer's step, so the same mechanism also serves the HF Trainer (`FrozenWeightsCallback`, `MaskedTrainer`)
and accelerate. The result is a normal HF model folder (gathered from the ZeRO-3 partitions on rank 0, written
atomically) with `freeze_report.json`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from . import distributed
from .compare import DriftStats
from .data import Example, Sample, build_samples, load_samples, pad_batch
from .errors import SafeneuronsError
from .freezing import FROZEN_ATTRIBUTE, FrozenWeights, MaskSource, freeze, local_layout, local_weights, reduce_over_ranks
from .models import save_hf_folder
from .outputs import atomic_file, write_json

log = logging.getLogger(__name__)

REPORT_FILE = "freeze_report.json"
LATEST_FILE = "latest"
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
TRAINING_DTYPES = ("float32", "bfloat16")


@dataclass
class FineTuneConfig:
    data: str
    save_path: str = ""
    num_epochs: int = 3
    learning_rate: float = 2e-5
    batch_size: int = 4
    max_length: int = 512
    weight_decay: float = 0.0
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    seed: int = 42
    dtype: str = "float32"
    deepspeed: str | None = None
    checkpoint_dir: str | None = None
    save_every: int | None = None
    resume: bool = False
    data_dir: str | None = None
    nsamples: int | None = None
    max_steps: int | None = None
    cache_dir: str | None = None
    add_eos: bool = False  # append EOS to each response (the original work does not)
    keep_checkpoints: int = 2  # the newest N checkpoints are kept, older ones deleted
    resume_override: tuple[str, ...] = ()  # run settings a resume may change

    def validate(self) -> None:
        for name in ("num_epochs", "batch_size", "max_length", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise SafeneuronsError(f"{name}={getattr(self, name)} must be a positive integer")
        for name in ("save_every", "max_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SafeneuronsError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.learning_rate <= 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise SafeneuronsError(f"learning_rate={self.learning_rate} must be > 0, weight_decay={self.weight_decay} "
                                   f"and max_grad_norm={self.max_grad_norm} must be >= 0")
        from .models import parse_dtype

        if parse_dtype(self.dtype) not in (torch.float32, torch.bfloat16):
            raise SafeneuronsError(f"dtype {self.dtype!r} is not supported for fine-tuning: use "
                                   f"{' or '.join(TRAINING_DTYPES)} (fp16 loss scaling would skip steps)")
        if (self.save_every or self.resume) and not self.checkpoint_dir:
            raise SafeneuronsError("--save-every and --resume need --checkpoint-dir")
        if self.keep_checkpoints < 1:
            raise SafeneuronsError(f"--keep-checkpoints {self.keep_checkpoints} must be at least 1")
        unknown = [key for key in self.resume_override if key not in RUN_KEYS]
        if unknown:
            raise SafeneuronsError(f"--resume-override {unknown[0]!r} is not a run setting; one of {', '.join(RUN_KEYS)}")


# The settings that decide a run's result: a resume that changes one of them is refused (unless overridden).
RUN_KEYS = ("data", "nsamples", "num_epochs", "learning_rate", "batch_size", "gradient_accumulation_steps",
            "max_length", "weight_decay", "max_grad_norm", "seed", "dtype", "add_eos", "masks")
SETTINGS_FILE = "run_settings.json"


def run_settings(config: FineTuneConfig, masks: Any) -> dict[str, Any]:
    """What a checkpoint records of its run (the mask file by path, in-memory masks by their selected count)."""
    settings = {key: getattr(config, key) for key in RUN_KEYS if key != "masks"}
    settings["masks"] = None if masks is None else str(masks) if isinstance(masks, (str, Path)) else \
        f"<in memory: {sum(int(mask.sum()) for mask in masks.values())} elements>" if isinstance(masks, Mapping) \
        else "<frozen weights>"
    return {**settings, "world_size": distributed.world_size()}


def complete_checkpoint(directory: Path) -> str:
    """The tag of the newest complete checkpoint: its run settings are written after every rank saved, so a
    checkpoint cut short by a killed job (which `latest` may already name) is passed over."""
    steps = sorted((int(path.parent.name.split("-", 1)[1]), path.parent.name)
                   for path in directory.glob(f"step-*/{SETTINGS_FILE}") if path.parent.name[5:].isdigit())
    if not steps:
        raise SafeneuronsError(f"--resume: no complete checkpoint in {directory}")
    return steps[-1][1]


def check_resume(directory: Path, settings: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Before anything is loaded: the newest complete checkpoint's run settings must equal this run's (keys in
    `overrides` may differ) and its world size this one's. Returns the checkpoint's settings and its `tag`."""
    tag = complete_checkpoint(directory)
    saved = json.loads((directory / tag / SETTINGS_FILE).read_text())
    if saved.get("world_size") != settings["world_size"]:
        raise SafeneuronsError(f"--resume: the checkpoint in {directory} was written by {saved.get('world_size')} "
                               f"rank(s) and this run has {settings['world_size']}; resume with "
                               f"{saved.get('world_size')} (resharding a checkpoint is not supported)")
    changed = [key for key in RUN_KEYS if saved.get(key) != settings[key] and key not in overrides]
    if changed:
        details = "; ".join(f"{key}: {saved.get(key)!r} then, {settings[key]!r} now" for key in changed)
        raise SafeneuronsError(f"--resume would change the run's settings ({details}); resume with the same "
                               f"settings, or allow a change with --resume-override {' '.join(changed)}")
    return {**saved, "tag": tag}


@dataclass
class FineTuneReport:
    frozen_count: int
    max_abs_change_frozen: float
    max_abs_change_free: float
    mean_abs_change_free: float
    free_count: int
    loss_curve: list[float]
    steps: int
    resumed_from_step: int
    world_size: int
    zero_stage: int | None
    mask_bytes_per_rank: list[int]
    mask_value_bytes_per_rank: list[int]
    seconds: float
    config: dict = field(default_factory=dict)
    run_settings: dict = field(default_factory=dict)  # what the run used (RUN_KEYS, mask source, world size)
    resumed_settings: dict = field(default_factory=dict)  # settings --resume-override changed: their values before

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# --- the data schedule ---------------------------------------------------------------------------------------
def micro_batch_plan(n_samples: int, config: FineTuneConfig, world: int, rank: int) -> list[list[int]]:
    """Sample indices of this rank's micro-batches for the whole run.

    Each epoch is a permutation drawn with `seed + epoch`, cut into global micro-batches of batch_size × world
    samples (rank r takes the r-th block); the epoch is padded, wrapping round the permutation, to a whole
    number of optimizer steps so every rank sees full batches. Depends only on (samples, config, world), which
    is what makes a resumed run see exactly the batches an uninterrupted run would."""
    per_micro = config.batch_size * world
    micro_per_epoch = math.ceil(math.ceil(n_samples / per_micro) / config.gradient_accumulation_steps)
    micro_per_epoch *= config.gradient_accumulation_steps
    plan: list[list[int]] = []
    for epoch in range(config.num_epochs):
        order = torch.randperm(n_samples, generator=torch.Generator().manual_seed(config.seed + epoch))
        needed = micro_per_epoch * per_micro
        order = order.repeat(math.ceil(needed / n_samples))[:needed].tolist()
        for micro in range(micro_per_epoch):
            start = micro * per_micro + rank * config.batch_size
            plan.append(order[start:start + config.batch_size])
    return plan


# --- training backends ---------------------------------------------------------------------------------------
class TrainingBackend(Protocol):
    module: nn.Module
    zero_stage: int | None

    def micro_step(self, batch: Mapping[str, torch.Tensor], boundary: bool) -> float: ...

    def save_checkpoint(self, directory: Path, step: int, client_state: dict) -> None: ...

    def load_checkpoint(self, directory: Path, tag: str) -> dict: ...


def _adamw(parameters: Sequence[nn.Parameter], config: FineTuneConfig) -> torch.optim.AdamW:
    """AdamW with the betas and eps of ds_configs/zero3.json, weight decay on every parameter."""
    return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay, betas=ADAM_BETAS,
                             eps=ADAM_EPS)


class TorchBackend:
    """Single-process AdamW loop: loss / accumulation steps, clipping and the step at the boundary."""

    zero_stage = None

    def __init__(self, model: nn.Module, config: FineTuneConfig) -> None:
        self.module, self.config = model, config
        self.optimizer = _adamw([p for p in model.parameters() if p.requires_grad], config)

    def micro_step(self, batch: Mapping[str, torch.Tensor], boundary: bool) -> float:
        loss = self.module(**batch).loss
        (loss / self.config.gradient_accumulation_steps).backward()
        if boundary:
            if self.config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.config.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def save_checkpoint(self, directory: Path, step: int, client_state: dict) -> None:
        tag = f"step-{step}"
        state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(), "client": client_state}
        (directory / tag).mkdir(parents=True, exist_ok=True)
        with atomic_file(directory / tag / "state.pt") as tmp:
            torch.save(state, tmp)
        with atomic_file(directory / LATEST_FILE) as tmp:
            tmp.write_text(tag)

    def load_checkpoint(self, directory: Path, tag: str) -> dict:
        state = torch.load(directory / tag / "state.pt", map_location="cpu", weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return state["client"]


class DeepSpeedBackend:
    """The DeepSpeed engine loop: `engine.backward` then `engine.step` (which steps only at the boundary)."""

    def __init__(self, model: nn.Module, ds_config: dict, config: FineTuneConfig) -> None:
        import deepspeed

        from .dsconfig import zero_stage

        self.zero_stage = zero_stage(ds_config)
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = None if "optimizer" in ds_config else _adamw(parameters, config)  # a config without one
        self.engine, *_ = deepspeed.initialize(model=model, config=ds_config, model_parameters=parameters,
                                               optimizer=optimizer)
        self.module = self.engine.module

    def micro_step(self, batch: Mapping[str, torch.Tensor], boundary: bool) -> float:
        loss = self.engine(**batch).loss
        self.engine.backward(loss)
        self.engine.step()
        return float(loss.detach().float())

    def save_checkpoint(self, directory: Path, step: int, client_state: dict) -> None:
        self.engine.save_checkpoint(str(directory), tag=f"step-{step}", client_state=client_state)

    def load_checkpoint(self, directory: Path, tag: str) -> dict:
        path, client_state = self.engine.load_checkpoint(str(directory), tag=tag)
        if path is None:
            raise SafeneuronsError(f"--resume: no DeepSpeed checkpoint in {directory}")
        return client_state


# --- measuring the change ------------------------------------------------------------------------------------
def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights this rank holds (its ZeRO-3 partitions, or the whole model)."""
    return {name: local_weights(param).detach().to("cpu", copy=True) for name, param in model.named_parameters()}


def measure_change(model: nn.Module, start: Mapping[str, torch.Tensor], frozen: FrozenWeights | None,
                   partitioned: bool) -> DriftStats:
    """Change of frozen and free elements since `start`, from the local partitions, reduced over ranks."""
    total = DriftStats()
    for name, param in model.named_parameters():
        _, _, valid = local_layout(param)
        after = local_weights(param).detach().cpu()[:valid]
        mask = frozen.local_mask(name) if frozen is not None else None
        mask = torch.zeros(valid, dtype=torch.bool) if mask is None else mask[:valid]
        total.add(DriftStats.of(start[name][:valid], after, mask))
    if partitioned:
        for key in ("frozen_count", "free_count", "frozen_abs_sum", "free_abs_sum"):
            setattr(total, key, type(getattr(total, key))(reduce_over_ranks(getattr(total, key))))
        for key in ("max_abs_change_frozen", "max_abs_change_free"):
            setattr(total, key, reduce_over_ranks(getattr(total, key), "max"))
    return total


# --- the loop --------------------------------------------------------------------------------------------------
@dataclass
class _RunState:
    step: int = 0
    loss_curve: list[float] = field(default_factory=list)


def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def train(backend: TrainingBackend, samples: Sequence[Sample], pad_token_id: int, config: FineTuneConfig,
          device: torch.device, state: _RunState, settings: Mapping[str, Any] | None = None) -> _RunState:
    """Run optimizer steps `state.step` .. the end of the plan (or max_steps), checkpointing as asked."""
    world, rank = distributed.world_size(), distributed.rank()
    plan = micro_batch_plan(len(samples), config, world, rank)
    accumulation = config.gradient_accumulation_steps
    total = len(plan) // accumulation
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    backend.module.train()
    for step in distributed.progress(range(state.step, total), desc="fine-tuning", initial=state.step, total=total):
        losses = []
        for micro in range(accumulation):
            batch = pad_batch([samples[index] for index in plan[step * accumulation + micro]], pad_token_id)
            losses.append(backend.micro_step(_to_device(batch, device), boundary=micro == accumulation - 1))
        state.loss_curve.append(reduce_over_ranks(sum(losses) / len(losses)) / world)
        state.step = step + 1
        if config.save_every and state.step % config.save_every == 0:
            _save_checkpoint(backend, config, state, settings or {})
    backend.module.eval()
    return state


def _save_checkpoint(backend: TrainingBackend, config: FineTuneConfig, state: _RunState,
                     settings: Mapping[str, Any]) -> None:
    """Collective: the checkpoint, its run settings, then (rank 0) the checkpoints beyond the newest N deleted."""
    directory = Path(config.checkpoint_dir)
    backend.save_checkpoint(directory, state.step, dataclasses.asdict(state))
    distributed.barrier()
    if distributed.is_main():
        write_json(directory / f"step-{state.step}" / SETTINGS_FILE, dict(settings))
        steps = sorted((int(path.name.split("-", 1)[1]), path) for path in directory.glob("step-*")
                       if path.is_dir() and path.name.split("-", 1)[1].isdigit())
        for _, old in steps[:-config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()


def _resume(backend: TrainingBackend, frozen: FrozenWeights | None, config: FineTuneConfig, tag: str) -> _RunState:
    client = backend.load_checkpoint(Path(config.checkpoint_dir), tag)
    state = _RunState(int(client["step"]), list(client["loss_curve"]))
    if frozen is not None and frozen.max_drift() != 0.0:
        raise SafeneuronsError(f"checkpoint in {config.checkpoint_dir} does not hold the original values of the "
                               f"frozen weights: it was made from another model or mask")
    log.info("resumed from step %d of %s", state.step, config.checkpoint_dir)
    return state


def run_fine_tuning(backend: TrainingBackend, frozen: FrozenWeights | None, samples: Sequence[Sample],
                    pad_token_id: int, config: FineTuneConfig, device: torch.device,
                    settings: Mapping[str, Any] | None = None) -> FineTuneReport:
    """Attach the frozen weights, (resume,) train and measure; collective under several ranks. `settings` are
    the run settings the checkpoints record (`run_settings`)."""
    started = time.perf_counter()
    settings = dict(settings or run_settings(config, frozen))
    resumed_with = check_resume(Path(config.checkpoint_dir), settings, config.resume_override) if config.resume \
        else None
    partitioned = frozen.partitioned if frozen is not None else backend.zero_stage == 3
    start = snapshot(backend.module)  # before resuming: changes are measured from the original weights
    if frozen is not None:
        frozen.attach(getattr(backend, "engine", None) or backend.optimizer)
    state = _resume(backend, frozen, config, resumed_with["tag"]) if resumed_with else _RunState()
    resumed_from = state.step
    state = train(backend, samples, pad_token_id, config, device, state, settings)
    change = measure_change(backend.module, start, frozen, partitioned)
    if frozen is not None:  # the frozen entries of the optimizer's fp32 master copies must not have moved either
        change.max_abs_change_frozen = max(change.max_abs_change_frozen, frozen.max_drift())
    mask_bytes = distributed.all_gather(frozen.mask_bytes if frozen else 0)
    value_bytes = distributed.all_gather(frozen.value_bytes if frozen else 0)
    return FineTuneReport(
        frozen_count=frozen.frozen_count() if frozen else 0, max_abs_change_frozen=change.max_abs_change_frozen,
        max_abs_change_free=change.max_abs_change_free, mean_abs_change_free=change.mean_abs_change_free or 0.0,
        free_count=change.free_count, loss_curve=state.loss_curve, steps=state.step, resumed_from_step=resumed_from,
        world_size=distributed.world_size(), zero_stage=backend.zero_stage, mask_bytes_per_rank=mask_bytes,
        mask_value_bytes_per_rank=value_bytes, seconds=round(time.perf_counter() - started, 3),
        config=dataclasses.asdict(config), run_settings=settings,
        resumed_settings={} if resumed_with is None else {key: resumed_with.get(key) for key in config.resume_override
                                                          if resumed_with.get(key) != settings.get(key)})


# --- saving --------------------------------------------------------------------------------------------------
def save_model(model: nn.Module, tokenizer: Any, report: FineTuneReport, save_path: str) -> None:
    """Write the HF folder (safetensors, config, tokenizer) and freeze_report.json atomically, on rank 0."""
    save_hf_folder(model, tokenizer, save_path, {REPORT_FILE: report.to_json()})


# --- the entry points --------------------------------------------------------------------------------------------
def _fill_ds_config(config: FineTuneConfig, model_name: str, world: int) -> dict:
    from transformers import AutoConfig

    from .dsconfig import fill_config
    from .models import parse_dtype, resolve_model_name

    hidden = getattr(AutoConfig.from_pretrained(resolve_model_name(model_name), cache_dir=config.cache_dir),
                     "hidden_size", None)
    return fill_config(config.deepspeed, micro_batch_size=config.batch_size,
                       gradient_accumulation_steps=config.gradient_accumulation_steps, world_size=world,
                       learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                       gradient_clipping=config.max_grad_norm, dtype=parse_dtype(config.dtype), hidden_size=hidden)


def fine_tune(model_name_or_dir: str, masks_path: MaskSource | None, config: FineTuneConfig) -> FineTuneReport:
    """Fine-tune a model with the masked weights frozen; collective. Writes the HF folder and freeze_report.json
    (rank 0) to `config.save_path` and returns the report on every rank."""
    from .data import check_sources
    from .masks import MaskReader
    from .models import load_model, load_tokenizer
    from .outputs import check_output_dir

    config.validate()
    if not config.save_path:
        raise SafeneuronsError("save_path is required: the folder for the fine-tuned model")
    check_output_dir(config.save_path)  # bad locations and inputs fail here, before any weight is read
    if isinstance(masks_path, (str, Path)):
        MaskReader(masks_path)
    check_sources(config.data, directory=config.data_dir)
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
    ds_config = _fill_ds_config(config, model_name_or_dir, context.world_size) if config.deepspeed else None
    model = load_model(model_name_or_dir, config.dtype, config.cache_dir,
                       None if ds_config else context.device, ds_config)
    frozen = freeze(model, masks_path) if masks_path is not None else None
    backend: TrainingBackend = DeepSpeedBackend(model, ds_config, config) if ds_config else TorchBackend(model, config)
    report = run_fine_tuning(backend, frozen, samples, tokenizer.pad_token_id, config, context.device, settings)
    save_model(backend.module, tokenizer, report, config.save_path)
    if distributed.is_main():
        log.info("fine-tuned %d steps: %d frozen elements, max |change| frozen %.3g, free %.3g; saved to %s",
                 report.steps, report.frozen_count, report.max_abs_change_frozen, report.max_abs_change_free,
                 config.save_path)
    return report


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
        self.report: FineTuneReport | None = None

    def fine_tune_model(self, training_data: str | Sequence[Example | Mapping[str, str]] = "alpaca_cleaned_no_safety",
                        num_epochs: int = 3, learning_rate: float = 2e-5, batch_size: int = 4, max_length: int = 512,
                        save_path: str | None = None, **options: Any) -> nn.Module:
        """Train in this process (plain AdamW loop) and return the fine-tuned model (the same object), its
        `FineTuneReport` as `model.fine_tune_report` and `self.report`; `options` are further FineTuneConfig fields.
        Writes the HF folder and freeze_report.json to `save_path` when given."""
        config = FineTuneConfig(data=training_data if isinstance(training_data, str) else "<in-memory>",
                                save_path=save_path or "", num_epochs=num_epochs, learning_rate=learning_rate,
                                batch_size=batch_size, max_length=max_length, **options)
        config.validate()
        samples = self._samples(training_data, config)
        backend = TorchBackend(self.model, config)
        device = next(self.model.parameters()).device
        report = run_fine_tuning(backend, self.frozen, samples, self.tokenizer.pad_token_id, config, device)
        if save_path:
            save_model(self.model, self.tokenizer, report, save_path)
        self.report = self.model.fine_tune_report = report
        return self.model

    def _samples(self, training_data: str | Sequence[Example | Mapping[str, str]],
                 config: FineTuneConfig) -> list[Sample]:
        if isinstance(training_data, str):
            return load_samples(training_data, self.tokenizer, config.nsamples, config.seed, config.max_length,
                                config.data_dir, config.add_eos)
        examples = [item if isinstance(item, Example) else Example(item["prompt"], item["response"])
                    for item in training_data]
        return build_samples(examples, self.tokenizer, config.nsamples, config.seed, config.max_length, config.add_eos)


# --- HF Trainer integration ---------------------------------------------------------------------------------------
class FrozenWeightsCallback(TrainerCallback):
    """Drop into any HF Trainer (with or without a DeepSpeed config): at train begin it wraps the step of the
    optimizer that owns the weights (under DeepSpeed the ZeRO optimizer inside the engine, which
    `DeepSpeedEngineWrapper.backward` steps), so the guarantee does not depend on Trainer callback timing.
    Build `frozen` with `freeze(model, masks)` before `trainer.train()` (under ZeRO-3, after the model was
    created with the Trainer's DeepSpeed config active)."""

    def __init__(self, frozen: FrozenWeights) -> None:
        self.frozen = frozen

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if optimizer is None:
            raise SafeneuronsError("FrozenWeightsCallback: the Trainer passed no optimizer at train begin")
        self.frozen.attach(optimizer)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.frozen.detach()


class MaskedTrainer(Trainer):
    """A transformers Trainer that freezes `masks=` (name -> bool tensor or a mask file), or a ready
    `frozen_weights=`, through `FrozenWeightsCallback`."""

    def __init__(self, *args: Any, masks: MaskSource | None = None, frozen_weights: FrozenWeights | None = None,
                 **kwargs: Any) -> None:
        if (masks is None) == (frozen_weights is None):
            raise SafeneuronsError("MaskedTrainer needs exactly one of masks= or frozen_weights=")
        super().__init__(*args, **kwargs)
        self.frozen_weights = frozen_weights or freeze(self.model, masks)
        self.add_callback(FrozenWeightsCallback(self.frozen_weights))


# --- CLI -------------------------------------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    from .cli import add_eos_argument, add_model_arguments, add_run_arguments

    add_model_arguments(parser, "--model", dtypes="float32 or bfloat16 (fp16 loss scaling would skip steps)")
    add_run_arguments(parser, out_required=False)
    parser.add_argument("--masks", default=None,
                        help="mask file or folder (masks.safetensors); without it, plain fine-tuning")
    parser.add_argument("--data", required=True, help="training data: a data set name or a file")
    parser.add_argument("--save-path", default=None, help="folder for the fine-tuned HF model (or --out)")
    defaults = FineTuneConfig(data="")
    for option, kind, meaning in (("--num-epochs", int, "passes over the data"),
                                  ("--learning-rate", float, "AdamW learning rate"),
                                  ("--batch-size", int, "samples per rank per micro-batch"),
                                  ("--max-length", int, "tokens per sample"),
                                  ("--weight-decay", float, "AdamW weight decay"),
                                  ("--gradient-accumulation-steps", int, "micro-batches per optimizer step"),
                                  ("--max-grad-norm", float, "gradient clipping norm, 0 = none")):
        dest = option[2:].replace("-", "_")
        parser.add_argument(option, type=kind, default=getattr(defaults, dest), help=meaning + " (default %(default)s)")
    parser.add_argument("--nsamples", type=int, default=None, help="train on this many samples (default all)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    parser.add_argument("--checkpoint-dir", default=None, help="folder for resumable checkpoints")
    parser.add_argument("--save-every", type=int, default=None, help="checkpoint every N optimizer steps")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in --checkpoint-dir (refused if the run's "
                             "settings or world size differ from the checkpoint's)")
    parser.add_argument("--resume-override", nargs="+", default=[], metavar="KEY",
                        help=f"run settings a --resume may change (of: {', '.join(RUN_KEYS)})")
    parser.add_argument("--keep-checkpoints", type=int, default=2,
                        help="keep the newest N checkpoints, delete older ones (default %(default)s)")
    add_eos_argument(parser)


def run(args: argparse.Namespace) -> int:
    save_path = args.save_path or args.out
    if not save_path:
        raise SafeneuronsError("--save-path (or --out) is required: the folder for the fine-tuned model")
    config = FineTuneConfig(
        data=args.data, save_path=save_path, num_epochs=args.num_epochs, learning_rate=args.learning_rate,
        batch_size=args.batch_size, max_length=args.max_length, weight_decay=args.weight_decay,
        gradient_accumulation_steps=args.gradient_accumulation_steps, max_grad_norm=args.max_grad_norm,
        seed=args.seed, dtype=args.dtype, deepspeed=args.deepspeed, checkpoint_dir=args.checkpoint_dir,
        save_every=args.save_every, resume=args.resume, data_dir=args.data_dir, nsamples=args.nsamples,
        max_steps=args.max_steps, cache_dir=args.cache_dir, add_eos=args.add_eos,
        keep_checkpoints=args.keep_checkpoints, resume_override=tuple(args.resume_override))
    report = fine_tune(args.model, args.masks, config)
    if distributed.is_main():
        print(f"fine-tuned {report.steps} steps; frozen {report.frozen_count} elements, max |change| frozen "
              f"{report.max_abs_change_frozen:g}, free {report.max_abs_change_free:g}; model in {save_path}")
    return 0
