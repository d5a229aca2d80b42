"""The training loop: steps, losses, the refusal curve, checkpoints, and the report of the change."""
from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import nn

from safeneurons.data.samples import pad_batch
from safeneurons.errors import SafeneuronsError
from safeneurons.finetune.config import REPORT_FILE, FineTuneResult
from safeneurons.finetune.constrained import pad_reference, reference_logprobs
from safeneurons.finetune.drift import DriftStats
from safeneurons.finetune.lisa import LisaState
from safeneurons.finetune.resume import SETTINGS_FILE, check_resume, run_settings
from safeneurons.finetune.schedule import micro_batch_plan, safety_batch_plan
from safeneurons.models.loading import save_hf_folder
from safeneurons.runtime import distributed
from safeneurons.runtime.distributed import mean_over_ranks, reduce_over_ranks
from safeneurons.runtime.resume import write_marker
from safeneurons.runtime.timing import Stopwatch
from safeneurons.runtime.tracking import Tracker
from safeneurons.runtime.zero3 import local_layout, local_weights

if TYPE_CHECKING:
    from safeneurons.data.examples import Sample
    from safeneurons.evaluation.refusal_curve import RefusalProbe
    from safeneurons.finetune.backends import TrainingBackend
    from safeneurons.finetune.config import FineTuneConfig
    from safeneurons.interventions.dynamic import DynamicFreezing
    from safeneurons.interventions.freezing import FrozenWeights

log = logging.getLogger(__name__)


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
    refusal_curve_seconds: float = 0.0  # of this process's measurements: the cost of the curve, not of training
    refusal_curve_cpu_seconds: float = 0.0


def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


@dataclass
class MicroBatches:
    """This rank's micro-batches: the training samples by `plan`, the safety samples by `safety_plan` (mixed into
    every step with --safety-data, or in place of the user's batch in Lisa's alignment steps), and the aligned
    log-probs of the constrained objective (`reference`)."""

    samples: Sequence[Sample]
    plan: list[list[int]]
    pad_token_id: int
    device: torch.device
    safety: Sequence[Sample] | None = None
    safety_plan: list[list[int]] | None = None
    mix_safety: bool = True
    reference: Sequence[torch.Tensor] | None = None

    def _safety_batch(self, index: int) -> dict[str, torch.Tensor]:
        return _to_device(pad_batch([self.safety[i] for i in self.safety_plan[index]], self.pad_token_id), self.device)

    def get(self, index: int, aligning: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """(batch, safety batch) of micro-batch `index`; in an alignment step the batch is the safety data's."""
        if aligning:
            return self._safety_batch(index), None
        batch = pad_batch([self.samples[i] for i in self.plan[index]], self.pad_token_id)
        if self.reference is not None:
            batch["reference_logprobs"] = pad_reference([self.reference[i] for i in self.plan[index]],
                                                         batch["labels"].shape[1] - 1)
        mixed = self._safety_batch(index) if self.safety_plan is not None and self.mix_safety else None
        return _to_device(batch, self.device), mixed


def train(backend: TrainingBackend, samples: Sequence[Sample], pad_token_id: int, config: FineTuneConfig,
          device: torch.device, state: RunState, settings: Mapping[str, Any] | None = None,
          safety: Sequence[Sample] | None = None, dynamic: DynamicFreezing | None = None,
          probe: RefusalProbe | None = None, tracker: Tracker | None = None,
          reference: Sequence[torch.Tensor] | None = None) -> RunState:
    """Run optimizer steps `state.step` .. the end of the plan (or max_steps), checkpointing as asked; with
    `safety` samples every micro-batch also takes a safety batch (see `safety_batch_plan`), or with --lisa-steps
    the alignment steps train on them (lisa.py); `dynamic` updates the frozen set after the steps it is due;
    `probe` measures the refusal rate at the steps it is due (before a checkpoint, so that a resumed run has every
    point); `tracker` receives each step's metrics; `reference` (each sample's aligned log-probs) makes every batch
    carry them for the constrained loss."""
    tracker = tracker or Tracker()
    world, rank = distributed.world_size(), distributed.rank()
    plan = micro_batch_plan(len(samples), config, world, rank)
    batches = MicroBatches(samples, plan, pad_token_id, device, safety,
                           safety_batch_plan(len(safety), len(plan), config, world, rank) if safety else None,
                           config.lisa_steps is None, reference)
    accumulation = config.gradient_accumulation_steps
    total = min(len(plan) // accumulation, config.max_steps or len(plan))
    lisa = None if config.lisa_steps is None else \
        LisaState.start(backend.module, config.lisa_steps, config.lisa_rho, total)
    backend.module.train()
    if probe is not None and not state.refusal_curve:
        _record_refusal(backend, probe, state, tracker)
    for step in distributed.progress(range(state.step, total), desc="fine-tuning", initial=state.step, total=total):
        losses, safety_losses, started = [], [], time.perf_counter()
        aligning = lisa is not None and lisa.before_step(step)
        backend.before_update = lisa.proximal.add_to_gradients if lisa and lisa.proximal_active(step) else None
        state.learning_rates.append(backend.learning_rate())
        for micro in range(accumulation):
            index = lisa.micro_batch(step, micro, accumulation, aligning) if lisa else step * accumulation + micro
            batch, safety_batch = batches.get(index, aligning)
            loss, safety_loss = backend.micro_step(batch, micro == accumulation - 1, safety_batch)
            losses.append(loss)
            safety_losses += [] if safety_loss is None else [safety_loss]
        state.loss_curve.append(mean_over_ranks(losses))
        if safety_losses:
            state.safety_loss_curve.append(mean_over_ranks(safety_losses))
        state.step = step + 1
        _track_step(tracker, backend, state, accumulation * config.batch_size * world, time.perf_counter() - started)
        if dynamic is not None:
            dynamic.after_step(state.step, len(plan) // accumulation)
        if probe is not None and probe.due(state.step, total):
            _record_refusal(backend, probe, state, tracker)
        if config.save_every and state.step % config.save_every == 0:
            _save_checkpoint(backend, config, state, settings or {}, dynamic)
    backend.module.eval()
    return state


def _track_step(tracker: Tracker, backend: TrainingBackend, state: RunState, samples: int, seconds: float) -> None:
    tracker.log({"train/loss": state.loss_curve[-1], "train/learning_rate": state.learning_rates[-1],
                 "train/grad_norm": backend.grad_norm(),
                 "train/safety_loss": state.safety_loss_curve[-1] if state.safety_loss_curve else None,
                 "train/samples_per_second": samples / seconds if seconds > 0 else None}, state.step)


def _record_refusal(backend: TrainingBackend, probe: RefusalProbe, state: RunState, tracker: Tracker) -> None:
    """A point of the refusal curve. Under ZeRO-3 generation leaves parameters that the engine prefetched for its
    own (training) module order in flight: they are released before training goes on."""
    started = Stopwatch()
    state.refusal_curve.append({"step": state.step, "refusal_rate": probe.measure(backend.module)})
    state.refusal_curve_seconds += started.seconds()
    state.refusal_curve_cpu_seconds += started.cpu_seconds()
    tracker.log({"eval/refusal_rate": state.refusal_curve[-1]["refusal_rate"]}, state.step)
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
        write_marker(directory / f"step-{state.step}" / SETTINGS_FILE, dict(settings))
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
                    dynamic: DynamicFreezing | None = None, probe: RefusalProbe | None = None,
                    tracker: Tracker | None = None) -> FineTuneResult:
    """Attach the frozen weights, (resume,) train and measure; collective under several ranks. `settings` are
    the run settings the checkpoints record (`run_settings`); `safety` the samples of --safety-data; `dynamic`
    (which holds `frozen`) re-scores the frozen set."""
    started = Stopwatch()
    settings = dict(settings or run_settings(config, frozen))
    resumed_with = check_resume(Path(config.checkpoint_dir), settings, config.resume_override) if config.resume \
        else None
    partitioned = frozen.partitioned if frozen is not None else backend.zero_stage == 3
    start = snapshot(backend.module)  # before resuming: changes are measured from the original weights
    reference = None if config.constrained_betas is None else \
        reference_logprobs(backend.module, samples, device)  # the aligned model's, also when resuming
    if frozen is not None:
        (dynamic or frozen).attach(getattr(backend, "engine", None) or backend.optimizer)
    state = _resume(backend, frozen, config, resumed_with["tag"], dynamic) if resumed_with else RunState()
    resumed_from = state.step
    state = train(backend, samples, pad_token_id, config, device, state, settings, safety, dynamic, probe, tracker,
                  reference)
    resumed_settings = {} if resumed_with is None else \
        {key: resumed_with.get(key) for key in config.resume_override if resumed_with.get(key) != settings.get(key)}
    report = build_report(backend.module, start, dynamic.frozen if dynamic else frozen, partitioned, state,
                          backend.zero_stage, config, settings, started, resumed_from, resumed_settings)
    report.rescoring = [dataclasses.asdict(record) for record in dynamic.history] if dynamic else []
    return report


def build_report(model: nn.Module, start: Mapping[str, torch.Tensor], frozen: FrozenWeights | None, partitioned: bool,
                 state: RunState, zero_stage: int | None, config: FineTuneConfig, settings: Mapping[str, Any],
                 started: Stopwatch, resumed_from: int = 0, resumed_settings: Mapping[str, Any] | None = None
                 ) -> FineTuneResult:
    """Measure the change since `start` and report the run; collective under several ranks."""
    change = measure_change(model, start, frozen, partitioned)
    if frozen is not None:  # the frozen entries of the optimizer's fp32 master copies must not have moved either
        change.max_abs_change_frozen = max(change.max_abs_change_frozen, frozen.max_drift())
    mask_bytes = distributed.all_gather(frozen.mask_bytes if frozen else 0)
    value_bytes = distributed.all_gather(frozen.value_bytes if frozen else 0)
    return FineTuneResult(
        frozen_count=frozen.frozen_count() if frozen else 0, max_abs_change_frozen=change.max_abs_change_frozen,
        max_abs_change_free=change.max_abs_change_free, mean_abs_change_free=change.mean_abs_change_free or 0.0,
        free_count=change.free_count, loss_curve=state.loss_curve, learning_rates=state.learning_rates,
        safety_loss_curve=state.safety_loss_curve, refusal_curve=state.refusal_curve, steps=state.step,
        resumed_from_step=resumed_from,
        world_size=distributed.world_size(), zero_stage=zero_stage, mask_bytes_per_rank=mask_bytes,
        mask_value_bytes_per_rank=value_bytes, seconds=round(started.seconds(), 3),
        cpu_seconds=round(started.cpu_seconds(), 3), refusal_curve_seconds=round(state.refusal_curve_seconds, 3),
        refusal_curve_cpu_seconds=round(state.refusal_curve_cpu_seconds, 3),
        config=dataclasses.asdict(config), run_settings=dict(settings), resumed_settings=dict(resumed_settings or {}))


# --- saving --------------------------------------------------------------------------------------------------
def save_model(model: nn.Module, tokenizer: Any, report: FineTuneResult, save_path: str) -> None:
    """Write the HF folder (safetensors, config, tokenizer) and freeze_report.json atomically, on rank 0."""
    save_hf_folder(model, tokenizer, save_path, {REPORT_FILE: report.to_json()})
