"""`safeneurons finetune`: fine-tuning with the safety-critical weights frozen, bit for bit.

Two training loops share one schedule and one report: a plain torch loop (single process, AdamW) and a DeepSpeed
engine loop (ZeRO stages 0-3, any launcher). The frozen weights (`freezing.freeze`) are attached to the
optimizer's step, so the same mechanism also serves the HF Trainer (`trainer.py`, also `--engine trainer`) and
accelerate. The result is a normal HF model folder (gathered from the ZeRO-3 partitions on rank 0, written
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

from . import distributed
from .compare import DriftStats
from .data import Example, Sample, build_samples, load_samples, pad_batch
from .errors import SafeneuronsError
from .dynamic import DynamicFreezing, rescore_config
from .freezing import FROZEN_ATTRIBUTE, FrozenWeights, MaskSource, freeze, local_layout, local_weights, reduce_over_ranks
from .models import save_hf_folder
from .outputs import atomic_file, write_json
from .refusal_curve import (DEFAULT_LIMIT, DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROMPTS, RefusalProbe, check_probe_settings,
                            make_probe)

log = logging.getLogger(__name__)

REPORT_FILE = "freeze_report.json"
LATEST_FILE = "latest"
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
TRAINING_DTYPES = ("float32", "bfloat16")
LR_SCHEDULERS = ("constant", "linear", "cosine")  # transformers' get_scheduler names (with warm-up when asked)
SAFETY_SEED_OFFSET = 1_000_003  # the safety batches' permutations are drawn apart from the training data's


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
    lr_scheduler: str = "constant"
    warmup_steps: int = 0  # optimizer steps of linear warm-up; or
    warmup_ratio: float = 0.0  # that fraction of the run's planned steps (rounded up, as transformers does)
    gradient_checkpointing: bool = False
    freeze_strength: float = 1.0  # 1 = bit-exact freeze, 0 = plain training (see FrozenWeights)
    safety_data: str | None = None  # a refusal data set whose loss is added to every step's, times safety_weight
    safety_weight: float = 1.0
    lora_r: int = 0  # 0 = full fine-tuning
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    rescore_every: int | None = None  # dynamic freezing: re-score every K optimizer steps
    rescore_mode: str = "union"
    engine: str = "loop"  # "trainer": the same job through transformers.Trainer (trainer.py)
    eval_every: int | None = None  # refusal curve: measure every K optimizer steps (refusal_curve.py)
    eval_prompts: str = DEFAULT_PROMPTS
    eval_limit: int = DEFAULT_LIMIT
    eval_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

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
        self._validate_extensions()
        unknown = [key for key in self.resume_override if key not in RUN_KEYS]
        if unknown:
            raise SafeneuronsError(f"--resume-override {unknown[0]!r} is not a run setting; one of {', '.join(RUN_KEYS)}")


    def _validate_extensions(self) -> None:
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise SafeneuronsError(f"--lr-scheduler {self.lr_scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}")
        if self.warmup_steps < 0 or not 0.0 <= self.warmup_ratio < 1.0:
            raise SafeneuronsError(f"--warmup-steps {self.warmup_steps} must be >= 0 and --warmup-ratio "
                                   f"{self.warmup_ratio} in [0, 1)")
        if self.warmup_steps and self.warmup_ratio:
            raise SafeneuronsError("give --warmup-steps or --warmup-ratio, not both")
        if not 0.0 <= self.freeze_strength <= 1.0:
            raise SafeneuronsError(f"--freeze-strength {self.freeze_strength} must be in [0, 1]")
        if self.safety_weight < 0:
            raise SafeneuronsError(f"--safety-weight {self.safety_weight} must be >= 0")
        if self.lora_r < 0 or self.lora_alpha <= 0 or (self.lora_r and not self.lora_targets):
            raise SafeneuronsError(f"--lora-r {self.lora_r} must be >= 0, --lora-alpha {self.lora_alpha} > 0 and "
                                   f"--lora-targets name at least one module")
        if self.rescore_every is not None and self.rescore_every < 1:
            raise SafeneuronsError(f"--rescore-every {self.rescore_every} must be a positive number of steps")
        if self.rescore_mode not in RESCORE_MODES:
            raise SafeneuronsError(f"--rescore-mode {self.rescore_mode!r} is not one of {', '.join(RESCORE_MODES)}")
        if self.lora_r and (self.rescore_every or self.freeze_strength != 1.0):
            raise SafeneuronsError("--lora-r protects masked elements exactly; --rescore-every and --freeze-strength "
                                   "act on fully trained weights, not on a LoRA adapter")
        check_probe_settings(self.eval_every, self.eval_limit, self.eval_max_new_tokens)
        if self.engine not in ENGINES:
            raise SafeneuronsError(f"--engine {self.engine!r} is not one of {', '.join(ENGINES)}")
        loop_only = {"--safety-data": self.safety_data, "--lora-r": self.lora_r, "--rescore-every": self.rescore_every,
                     "--checkpoint-dir": self.checkpoint_dir, "--eval-every": self.eval_every}
        if self.engine == "trainer" and any(loop_only.values()):
            raise SafeneuronsError(f"--engine trainer does not take {', '.join(k for k, v in loop_only.items() if v)}: "
                                   f"use the built-in loop (--engine loop)")

    def check_needs_masks(self, has_masks: bool) -> None:
        """Options that modify a freeze are refused without one."""
        if not has_masks and (self.freeze_strength != 1.0 or self.rescore_every):
            raise SafeneuronsError("--freeze-strength and --rescore-every act on frozen weights: give --masks")


RESCORE_MODES = ("union", "replace")
ENGINES = ("loop", "trainer")
# The settings that decide a run's result: a resume that changes one of them is refused (unless overridden).
RUN_KEYS = ("data", "nsamples", "num_epochs", "learning_rate", "batch_size", "gradient_accumulation_steps",
            "max_length", "weight_decay", "max_grad_norm", "seed", "dtype", "add_eos", "masks", "lr_scheduler",
            "warmup_steps", "warmup_ratio", "freeze_strength", "safety_data", "safety_weight", "lora_r",
            "lora_alpha", "lora_targets", "rescore_every", "rescore_mode")
SETTINGS_FILE = "run_settings.json"


def run_settings(config: FineTuneConfig, masks: Any) -> dict[str, Any]:
    """What a checkpoint records of its run (the mask file by path, in-memory masks by their selected count)."""
    settings = {key: getattr(config, key) for key in RUN_KEYS if key != "masks"}
    settings["lora_targets"] = list(config.lora_targets)  # as JSON reads it back
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
    defaults = run_settings(FineTuneConfig(data=""), None)  # what a checkpoint from before a setting existed used
    saved = {**{key: defaults[key] for key in RUN_KEYS if key not in ("data", "masks")},
             **json.loads((directory / tag / SETTINGS_FILE).read_text())}
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
    learning_rates: list[float]  # the rate each optimizer step used
    safety_loss_curve: list[float]  # with --safety-data: the safety loss per step (loss_curve is the task's)
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
    rescoring: list = field(default_factory=list)  # --rescore-every: the frozen set's updates (dynamic.Rescoring)
    refusal_curve: list = field(default_factory=list)  # --eval-every: [{"step", "refusal_rate"}] (refusal_curve.py)

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
    micro_per_epoch = micro_batches_per_epoch(n_samples, config, world)
    plan: list[list[int]] = []
    for epoch in range(config.num_epochs):
        order = torch.randperm(n_samples, generator=torch.Generator().manual_seed(config.seed + epoch))
        needed = micro_per_epoch * per_micro
        order = order.repeat(math.ceil(needed / n_samples))[:needed].tolist()
        for micro in range(micro_per_epoch):
            start = micro * per_micro + rank * config.batch_size
            plan.append(order[start:start + config.batch_size])
    return plan


def micro_batches_per_epoch(n_samples: int, config: FineTuneConfig, world: int) -> int:
    micro = math.ceil(n_samples / (config.batch_size * world))
    return math.ceil(micro / config.gradient_accumulation_steps) * config.gradient_accumulation_steps


def planned_steps(n_samples: int, config: FineTuneConfig, world: int) -> int:
    """Optimizer steps of the whole plan: the length of the learning-rate schedule. `max_steps` stops a run early
    without changing its schedule, so a run stopped there and resumed equals the uninterrupted one."""
    return micro_batches_per_epoch(n_samples, config, world) * config.num_epochs // config.gradient_accumulation_steps


def safety_batch_plan(n_safety: int, micro_batches: int, config: FineTuneConfig, world: int,
                      rank: int) -> list[list[int]]:
    """Safety-data micro-batches, one per training micro-batch: the same epoch scheme over the safety samples
    (with their own seed), repeated for as many epochs as the training plan needs."""
    epochs = math.ceil(micro_batches / micro_batches_per_epoch(n_safety, config, world))
    return micro_batch_plan(n_safety, dataclasses.replace(config, num_epochs=epochs,
                                                          seed=config.seed + SAFETY_SEED_OFFSET), world, rank)


def make_scheduler(optimizer: torch.optim.Optimizer, config: FineTuneConfig, total_steps: int) -> Any:
    """transformers' schedule over `total_steps` optimizer steps, warm-up from `--warmup-steps/--warmup-ratio`."""
    from transformers import get_scheduler

    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    return get_scheduler(scheduler_name(config, bool(warmup)), optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps)


def scheduler_name(config: FineTuneConfig, warmup: bool) -> str:
    """transformers' name of `--lr-scheduler`: `constant` with warm-up is `constant_with_warmup`."""
    return "constant_with_warmup" if config.lr_scheduler == "constant" and warmup else config.lr_scheduler


# --- training backends ---------------------------------------------------------------------------------------
class TrainingBackend(Protocol):
    module: nn.Module
    zero_stage: int | None

    def micro_step(self, batch: Mapping[str, torch.Tensor], boundary: bool,
                   safety_batch: Mapping[str, torch.Tensor] | None = None) -> tuple[float, float | None]: ...

    def learning_rate(self) -> float: ...

    def save_checkpoint(self, directory: Path, step: int, client_state: dict) -> None: ...

    def load_checkpoint(self, directory: Path, tag: str) -> dict: ...


def _adamw(parameters: Sequence[nn.Parameter], config: FineTuneConfig) -> torch.optim.AdamW:
    """AdamW with the betas and eps of ds_configs/zero3.json, weight decay on every parameter."""
    return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay, betas=ADAM_BETAS,
                             eps=ADAM_EPS)


def _losses(module: nn.Module, batch: Mapping[str, torch.Tensor], safety_batch: Mapping[str, torch.Tensor] | None,
            safety_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(objective, task loss, safety loss): the objective adds safety_weight × the loss on the safety batch."""
    loss = module(**batch).loss
    if safety_batch is None:
        return loss, loss, None
    safety_loss = module(**safety_batch).loss
    return loss + safety_weight * safety_loss, loss, safety_loss


def _floats(loss: torch.Tensor, safety_loss: torch.Tensor | None) -> tuple[float, float | None]:
    return float(loss.detach().float()), None if safety_loss is None else float(safety_loss.detach().float())


class TorchBackend:
    """Single-process AdamW loop: loss / accumulation steps, clipping, the step and the schedule at the boundary."""

    zero_stage = None

    def __init__(self, model: nn.Module, config: FineTuneConfig, total_steps: int) -> None:
        self.module, self.config = model, config
        self.optimizer = _adamw([p for p in model.parameters() if p.requires_grad], config)
        self.scheduler = make_scheduler(self.optimizer, config, total_steps)

    def micro_step(self, batch: Mapping[str, torch.Tensor], boundary: bool,
                   safety_batch: Mapping[str, torch.Tensor] | None = None) -> tuple[float, float | None]:
        objective, loss, safety_loss = _losses(self.module, batch, safety_batch, self.config.safety_weight)
        (objective / self.config.gradient_accumulation_steps).backward()
        if boundary:
            if self.config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.config.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return _floats(loss, safety_loss)

    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save_checkpoint(self, directory: Path, step: int, client_state: dict) -> None:
        tag = f"step-{step}"
        state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "client": client_state}
        (directory / tag).mkdir(parents=True, exist_ok=True)
        with atomic_file(directory / tag / "state.pt") as tmp:
            torch.save(state, tmp)
        with atomic_file(directory / LATEST_FILE) as tmp:
            tmp.write_text(tag)

    def load_checkpoint(self, directory: Path, tag: str) -> dict:
        state = torch.load(directory / tag / "state.pt", map_location="cpu", weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return state["client"]


class DeepSpeedBackend:
    """The DeepSpeed engine loop: `engine.backward` then `engine.step` (which steps only at the boundary)."""

    def __init__(self, model: nn.Module, ds_config: dict, config: FineTuneConfig, total_steps: int) -> None:
        import deepspeed

        from .dsconfig import zero_stage

        self.zero_stage, self.config = zero_stage(ds_config), config
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = None if "optimizer" in ds_config else _adamw(parameters, config)  # a config without one
        # the engine steps the schedule after each optimizer step and keeps it in its checkpoints
        scheduler = None if "scheduler" in ds_config else lambda opt: make_scheduler(opt, config, total_steps)
        self.engine, *_ = deepspeed.initialize(model=model, config=ds_config, model_parameters=parameters,
                                               optimizer=optimizer, lr_scheduler=scheduler)
        self.module = self.engine.module

    def micro_step(self, batch: Mapping[str, torch.Tensor], boundary: bool,
                   safety_batch: Mapping[str, torch.Tensor] | None = None) -> tuple[float, float | None]:
        objective, loss, safety_loss = _losses(self.engine, batch, safety_batch, self.config.safety_weight)
        self.engine.backward(objective)
        self.engine.step()
        return _floats(loss, safety_loss)

    def learning_rate(self) -> float:
        return float(self.engine.get_lr()[0])

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
class RunState:
    step: int = 0
    loss_curve: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    safety_loss_curve: list[float] = field(default_factory=list)
    refusal_curve: list[dict] = field(default_factory=list)


def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def _mean_over_ranks(values: Sequence[float]) -> float:
    return reduce_over_ranks(sum(values) / len(values)) / distributed.world_size()


def train(backend: TrainingBackend, samples: Sequence[Sample], pad_token_id: int, config: FineTuneConfig,
          device: torch.device, state: RunState, settings: Mapping[str, Any] | None = None,
          safety: Sequence[Sample] | None = None, dynamic: DynamicFreezing | None = None,
          probe: RefusalProbe | None = None) -> RunState:
    """Run optimizer steps `state.step` .. the end of the plan (or max_steps), checkpointing as asked; with
    `safety` samples every micro-batch also takes a safety batch (see `safety_batch_plan`); `dynamic` updates
    the frozen set after the steps it is due; `probe` measures the refusal rate at the steps it is due (before
    a checkpoint, so that a resumed run has every point)."""
    world, rank = distributed.world_size(), distributed.rank()
    plan = micro_batch_plan(len(samples), config, world, rank)
    safety_plan = safety_batch_plan(len(safety), len(plan), config, world, rank) if safety else None
    accumulation = config.gradient_accumulation_steps
    total = len(plan) // accumulation
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    backend.module.train()
    if probe is not None and not state.refusal_curve:
        _record_refusal(backend, probe, state)
    for step in distributed.progress(range(state.step, total), desc="fine-tuning", initial=state.step, total=total):
        losses, safety_losses = [], []
        state.learning_rates.append(backend.learning_rate())
        for micro in range(accumulation):
            index = step * accumulation + micro
            batch = pad_batch([samples[i] for i in plan[index]], pad_token_id)
            safety_batch = None if safety_plan is None else \
                _to_device(pad_batch([safety[i] for i in safety_plan[index]], pad_token_id), device)
            loss, safety_loss = backend.micro_step(_to_device(batch, device), micro == accumulation - 1, safety_batch)
            losses.append(loss)
            safety_losses += [] if safety_loss is None else [safety_loss]
        state.loss_curve.append(_mean_over_ranks(losses))
        if safety_losses:
            state.safety_loss_curve.append(_mean_over_ranks(safety_losses))
        state.step = step + 1
        if dynamic is not None:
            dynamic.after_step(state.step, len(plan) // accumulation)
        if probe is not None and probe.due(state.step, total):
            _record_refusal(backend, probe, state)
        if config.save_every and state.step % config.save_every == 0:
            _save_checkpoint(backend, config, state, settings or {}, dynamic)
    backend.module.eval()
    return state


def _record_refusal(backend: TrainingBackend, probe: RefusalProbe, state: RunState) -> None:
    """A point of the refusal curve. Under ZeRO-3 generation leaves parameters that the engine prefetched for its
    own (training) module order in flight: they are released before training goes on."""
    state.refusal_curve.append({"step": state.step, "refusal_rate": probe.measure(backend.module)})
    engine = getattr(backend, "engine", None)
    if engine is not None and getattr(backend, "zero_stage", None) == 3:
        engine.empty_partition_cache()


def _save_checkpoint(backend: TrainingBackend, config: FineTuneConfig, state: RunState,
                     settings: Mapping[str, Any], dynamic: DynamicFreezing | None = None) -> None:
    """Collective: the checkpoint (with the dynamic frozen set), its run settings, then (rank 0) the checkpoints
    beyond the newest N deleted."""
    directory = Path(config.checkpoint_dir)
    backend.save_checkpoint(directory, state.step, dataclasses.asdict(state))
    if dynamic is not None:
        dynamic.save(directory / f"step-{state.step}")
    distributed.barrier()
    if distributed.is_main():
        write_json(directory / f"step-{state.step}" / SETTINGS_FILE, dict(settings))
        steps = sorted((int(path.name.split("-", 1)[1]), path) for path in directory.glob("step-*")
                       if path.is_dir() and path.name.split("-", 1)[1].isdigit())
        for _, old in steps[:-config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()


def _resume(backend: TrainingBackend, frozen: FrozenWeights | None, config: FineTuneConfig, tag: str,
            dynamic: DynamicFreezing | None = None) -> RunState:
    client = backend.load_checkpoint(Path(config.checkpoint_dir), tag)
    state = RunState(int(client["step"]), list(client["loss_curve"]), list(client.get("learning_rates", [])),
                     list(client.get("safety_loss_curve", [])), list(client.get("refusal_curve", [])))
    if dynamic is not None:
        dynamic.load(Path(config.checkpoint_dir) / tag)
    elif frozen is not None and frozen.max_drift() != 0.0:
        raise SafeneuronsError(f"checkpoint in {config.checkpoint_dir} does not hold the original values of the "
                               f"frozen weights: it was made from another model or mask")
    log.info("resumed from step %d of %s", state.step, config.checkpoint_dir)
    return state


def run_fine_tuning(backend: TrainingBackend, frozen: FrozenWeights | None, samples: Sequence[Sample],
                    pad_token_id: int, config: FineTuneConfig, device: torch.device,
                    settings: Mapping[str, Any] | None = None, safety: Sequence[Sample] | None = None,
                    dynamic: DynamicFreezing | None = None, probe: RefusalProbe | None = None) -> FineTuneReport:
    """Attach the frozen weights, (resume,) train and measure; collective under several ranks. `settings` are
    the run settings the checkpoints record (`run_settings`); `safety` the samples of --safety-data; `dynamic`
    (which holds `frozen`) re-scores the frozen set."""
    started = time.perf_counter()
    settings = dict(settings or run_settings(config, frozen))
    resumed_with = check_resume(Path(config.checkpoint_dir), settings, config.resume_override) if config.resume \
        else None
    partitioned = frozen.partitioned if frozen is not None else backend.zero_stage == 3
    start = snapshot(backend.module)  # before resuming: changes are measured from the original weights
    if frozen is not None:
        (dynamic or frozen).attach(getattr(backend, "engine", None) or backend.optimizer)
    state = _resume(backend, frozen, config, resumed_with["tag"], dynamic) if resumed_with else RunState()
    resumed_from = state.step
    state = train(backend, samples, pad_token_id, config, device, state, settings, safety, dynamic, probe)
    resumed_settings = {} if resumed_with is None else \
        {key: resumed_with.get(key) for key in config.resume_override if resumed_with.get(key) != settings.get(key)}
    report = build_report(backend.module, start, dynamic.frozen if dynamic else frozen, partitioned, state,
                          backend.zero_stage, config, settings, started, resumed_from, resumed_settings)
    report.rescoring = [dataclasses.asdict(record) for record in dynamic.history] if dynamic else []
    return report


def build_report(model: nn.Module, start: Mapping[str, torch.Tensor], frozen: FrozenWeights | None, partitioned: bool,
                 state: RunState, zero_stage: int | None, config: FineTuneConfig, settings: Mapping[str, Any],
                 started: float, resumed_from: int = 0, resumed_settings: Mapping[str, Any] | None = None
                 ) -> FineTuneReport:
    """Measure the change since `start` and report the run; collective under several ranks."""
    change = measure_change(model, start, frozen, partitioned)
    if frozen is not None:  # the frozen entries of the optimizer's fp32 master copies must not have moved either
        change.max_abs_change_frozen = max(change.max_abs_change_frozen, frozen.max_drift())
    mask_bytes = distributed.all_gather(frozen.mask_bytes if frozen else 0)
    value_bytes = distributed.all_gather(frozen.value_bytes if frozen else 0)
    return FineTuneReport(
        frozen_count=frozen.frozen_count() if frozen else 0, max_abs_change_frozen=change.max_abs_change_frozen,
        max_abs_change_free=change.max_abs_change_free, mean_abs_change_free=change.mean_abs_change_free or 0.0,
        free_count=change.free_count, loss_curve=state.loss_curve, learning_rates=state.learning_rates,
        safety_loss_curve=state.safety_loss_curve, refusal_curve=state.refusal_curve, steps=state.step,
        resumed_from_step=resumed_from,
        world_size=distributed.world_size(), zero_stage=zero_stage, mask_bytes_per_rank=mask_bytes,
        mask_value_bytes_per_rank=value_bytes, seconds=round(time.perf_counter() - started, 3),
        config=dataclasses.asdict(config), run_settings=dict(settings), resumed_settings=dict(resumed_settings or {}))


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


def fine_tune(model_name_or_dir: str, masks_path: MaskSource | None, config: FineTuneConfig) -> FineTuneReport:
    """Fine-tune a model with the masked weights frozen; collective. Writes the HF folder and freeze_report.json
    (rank 0) to `config.save_path` and returns the report on every rank."""
    from .data import check_sources
    from .masks import MaskReader
    from .models import load_model, load_tokenizer
    from .outputs import check_output_dir

    config.validate()
    config.check_needs_masks(masks_path is not None)
    if not config.save_path:
        raise SafeneuronsError("save_path is required: the folder for the fine-tuned model")
    check_output_dir(config.save_path)  # bad locations and inputs fail here, before any weight is read
    if isinstance(masks_path, (str, Path)):
        MaskReader(masks_path)
    check_sources(config.data, config.safety_data, config.eval_prompts if config.eval_every else None,
                  directory=config.data_dir)
    score_config = rescore_config(masks_path, config.data_dir) if config.rescore_every else None
    if score_config is not None:
        check_sources(score_config.data, score_config.utility_data, directory=config.data_dir)
    if config.lora_r:
        from .lora import check_targets
        from .models import model_skeleton

        check_targets(model_skeleton(model_name_or_dir, config.cache_dir), config.lora_targets)
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
    if config.lora_r:
        report, model = fine_tune_lora(model, masks_path, samples, safety, tokenizer.pad_token_id, config, ds_config,
                                       context, settings, probe)
        save_model(model, tokenizer, report, config.save_path)
        return _logged(report, config)
    frozen = freeze(model, masks_path, config.freeze_strength) if masks_path is not None else None
    if config.engine == "trainer":
        from .dsconfig import zero_stage
        from .trainer import train_with_trainer

        report = train_with_trainer(model, frozen, samples, tokenizer.pad_token_id, config, ds_config, settings,
                                    zero_stage(ds_config) if ds_config else None)
        save_model(model, tokenizer, report, config.save_path)
    else:
        backend = make_backend(model, ds_config, config, len(samples), context.world_size)
        dynamic = None if score_config is None else DynamicFreezing(
            frozen, backend.module, tokenizer, score_config, config.rescore_every, config.rescore_mode, context.device)
        report = run_fine_tuning(backend, frozen, samples, tokenizer.pad_token_id, config, context.device, settings,
                                 safety, dynamic, probe)
        save_model(backend.module, tokenizer, report, config.save_path)
    return _logged(report, config)


def make_backend(model: nn.Module, ds_config: dict | None, config: FineTuneConfig, n_samples: int,
                 world: int) -> TrainingBackend:
    """The DeepSpeed engine loop under a DeepSpeed config, else the plain loop; the schedule spans the plan."""
    total_steps = planned_steps(n_samples, config, world)
    return DeepSpeedBackend(model, ds_config, config, total_steps) if ds_config else \
        TorchBackend(model, config, total_steps)


def _logged(report: FineTuneReport, config: FineTuneConfig) -> FineTuneReport:
    if distributed.is_main():
        log.info("fine-tuned %d steps: %d frozen elements, max |change| frozen %.3g, free %.3g; saved to %s",
                 report.steps, report.frozen_count, report.max_abs_change_frozen, report.max_abs_change_free,
                 config.save_path)
    return report


def fine_tune_lora(model: nn.Module, masks: MaskSource | None, samples: Sequence[Sample],
                   safety: Sequence[Sample] | None, pad_token_id: int, config: FineTuneConfig, ds_config: dict | None,
                   context: distributed.DistContext, settings: Mapping[str, Any], probe: RefusalProbe | None = None
                   ) -> tuple[FineTuneReport, nn.Module]:
    """LoRA on the base model (protected by `masks` when given, see lora.py), trained by the same loop, merged
    into the base weights; the report measures the merged model against the original (masked elements: 0)."""
    from .lora import add_adapters, merge_adapters

    started = time.perf_counter()
    protected = freeze(model, masks) if masks is not None else None  # never attached: it measures
    start = snapshot(model)
    adapted = add_adapters(model, config.lora_r, config.lora_alpha, config.lora_targets, masks)
    backend = make_backend(adapted, ds_config, config, len(samples), context.world_size)
    trained = run_fine_tuning(backend, None, samples, pad_token_id, config, context.device, settings, safety,
                              probe=probe)
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
        config.check_needs_masks(self.frozen is not None)
        if self.frozen is not None:
            self.frozen.strength = config.freeze_strength
        samples = self._samples(training_data, config, config.nsamples)
        safety = self._samples(config.safety_data, config, None) if config.safety_data else None
        prepare_model(self.model, config)
        backend = TorchBackend(self.model, config, planned_steps(len(samples), config, 1))
        device = next(self.model.parameters()).device
        report = run_fine_tuning(backend, self.frozen, samples, self.tokenizer.pad_token_id, config, device,
                                 safety=safety)
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
    parser.add_argument("--engine", default="loop", help=f"{' or '.join(ENGINES)}: the built-in loop (default), or "
                        f"the same job through transformers.Trainer")
    add_training_extensions(parser, defaults)


def add_training_extensions(parser: argparse.ArgumentParser, defaults: FineTuneConfig) -> None:
    """Schedules, activation checkpointing, partial and dynamic freezing, the safety loss and LoRA."""
    group = parser.add_argument_group("schedule, memory and the seed's extensions")
    group.add_argument("--lr-scheduler", default=defaults.lr_scheduler,
                       help=f"learning-rate schedule over the planned steps: {', '.join(LR_SCHEDULERS)} "
                            f"(transformers'; default %(default)s)")
    group.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default 0)")
    group.add_argument("--warmup-ratio", type=float, default=0.0,
                       help="warm-up as a fraction of the planned steps, rounded up (default 0)")
    group.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute each decoder layer's activations in the backward (less memory, more time)")
    group.add_argument("--freeze-strength", type=float, default=1.0,
                       help="s in [0, 1]: after each step a masked element becomes lerp(after, before, s); 1 = "
                            "bit-exact freeze (default), 0 = plain training")
    group.add_argument("--rescore-every", type=int, default=None, metavar="K",
                       help="dynamic freezing: re-score every K optimizer steps (method and data of the mask's "
                            "score_summary.json) and update the frozen set")
    group.add_argument("--rescore-mode", default=defaults.rescore_mode,
                       help=f"{' or '.join(RESCORE_MODES)}: add the new selection to the frozen set, or replace it "
                            f"(default %(default)s)")
    group.add_argument("--safety-data", default=None,
                       help="refusal data (a data set name or a file): each step adds --safety-weight × its loss")
    group.add_argument("--safety-weight", type=float, default=defaults.safety_weight,
                       help="λ of the safety loss (default %(default)s)")
    group.add_argument("--eval-every", type=int, default=None, metavar="K",
                       help="refusal curve: the keyword refusal rate on --eval-prompts before training, every K "
                            "optimizer steps and at the end (greedy; freeze_report.json's refusal_curve)")
    group.add_argument("--eval-prompts", default=defaults.eval_prompts,
                       help="held-out harmful prompts of the curve (default %(default)s)")
    group.add_argument("--eval-limit", type=int, default=defaults.eval_limit,
                       help="the first N of them (default %(default)s)")
    group.add_argument("--eval-max-new-tokens", type=int, default=defaults.eval_max_new_tokens,
                       help="new tokens per generation of the curve (default %(default)s)")
    group.add_argument("--lora-r", type=int, default=0, help="LoRA rank through PEFT; 0 = full fine-tuning (default)")
    group.add_argument("--lora-alpha", type=float, default=defaults.lora_alpha, help="LoRA alpha (default %(default)s)")
    group.add_argument("--lora-targets", default=",".join(defaults.lora_targets),
                       help="comma-separated module names LoRA adapts (default %(default)s); with --masks the "
                            "adapter's contribution at masked elements is held at zero")


EXTENSION_KEYS = ("lr_scheduler", "warmup_steps", "warmup_ratio", "gradient_checkpointing", "freeze_strength",
                  "rescore_every", "rescore_mode", "safety_data", "safety_weight", "lora_r", "lora_alpha",
                  "eval_every", "eval_prompts", "eval_limit", "eval_max_new_tokens")


def extension_options(args: argparse.Namespace) -> dict[str, Any]:
    """The FineTuneConfig fields of `add_training_extensions`' options."""
    options = {key: getattr(args, key) for key in EXTENSION_KEYS}
    options["lora_targets"] = tuple(name.strip() for name in args.lora_targets.split(",") if name.strip())
    return options


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
        keep_checkpoints=args.keep_checkpoints, resume_override=tuple(args.resume_override),
        engine=args.engine, **extension_options(args))
    report = fine_tune(args.model, args.masks, config)
    if distributed.is_main():
        print(f"fine-tuned {report.steps} steps; frozen {report.frozen_count} elements, max |change| frozen "
              f"{report.max_abs_change_frozen:g}, free {report.max_abs_change_free:g}; model in {save_path}")
    return 0
