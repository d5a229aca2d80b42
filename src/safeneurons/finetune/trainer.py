"""The HF Trainer with frozen safety-critical weights: a callback for any `transformers.Trainer`, a Trainer
subclass, and `finetune --engine trainer`, the same job as the built-in loop run by the Trainer (its own data
order, schedule and DeepSpeed integration) with the same report and saved folder.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from safeneurons.data.samples import pad_batch
from safeneurons.errors import SafeneuronsError
from safeneurons.finetune.config import ADAM_BETAS, ADAM_EPS
from safeneurons.finetune.loop import RunState, build_report, snapshot
from safeneurons.finetune.schedule import scheduler_name
from safeneurons.interventions.freezing import freeze
from safeneurons.runtime import distributed
from safeneurons.runtime.timing import Stopwatch
from safeneurons.runtime.tracking import Tracker

if TYPE_CHECKING:
    from safeneurons.data.examples import Sample
    from safeneurons.finetune.config import FineTuneConfig, FineTuneResult
    from safeneurons.interventions.freezing import FrozenWeights
    from safeneurons.masks.source import MaskSource


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


class _LearningRates(TrainerCallback):
    """The rate each optimizer step uses (the Trainer's logs give the rate after its scheduler stepped)."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, lr_scheduler: Any = None, **kwargs: Any) -> None:
        self.rates.append(float(lr_scheduler.get_last_lr()[0]))


class TrackerCallback(TrainerCallback):
    """The Trainer's logs to our tracker, under the loop's names (its learning rate is the one after the step)."""

    NAMES = {"loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm",
             "train_samples_per_second": "train/samples_per_second"}

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, float] | None = None,
               **kwargs: Any) -> None:
        self.tracker.log({name: float(logs[key]) for key, name in self.NAMES.items() if key in (logs or {})},
                         int(state.global_step))


def training_arguments(config: FineTuneConfig, ds_config: Mapping[str, Any] | None, output_dir: str
                       ) -> TrainingArguments:
    """`FineTuneConfig` as TrainingArguments: the same optimizer, schedule, clipping, precision and DeepSpeed
    config; no Trainer checkpoints (the model is saved as by the built-in loop)."""
    warmup = config.warmup_steps or config.warmup_ratio  # transformers reads a value below 1 as a ratio
    scheduler = scheduler_name(config, bool(warmup))
    return TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps, learning_rate=config.learning_rate,
        weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm, adam_beta1=ADAM_BETAS[0],
        adam_beta2=ADAM_BETAS[1], adam_epsilon=ADAM_EPS, num_train_epochs=config.num_epochs,
        max_steps=config.max_steps or -1, lr_scheduler_type=scheduler, warmup_steps=warmup, seed=config.seed,
        data_seed=config.seed, bf16=config.dtype == "bfloat16", deepspeed=dict(ds_config) if ds_config else None,
        gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        save_strategy="no", logging_strategy="steps", logging_steps=1, report_to=[],
        use_cpu=not torch.cuda.is_available(), disable_tqdm=not distributed.is_main(), remove_unused_columns=False)


def train_with_trainer(model: nn.Module, frozen: FrozenWeights | None, samples: Sequence[Sample], pad_token_id: int,
                       config: FineTuneConfig, ds_config: Mapping[str, Any] | None, settings: Mapping[str, Any],
                       zero_stage: int | None, tracker: Tracker | None = None) -> FineTuneResult:
    """Train `model` (built under the DeepSpeed config when there is one) with `MaskedTrainer`; collective."""
    started = Stopwatch()
    partitioned = frozen.partitioned if frozen is not None else zero_stage == 3
    start = snapshot(model)
    rates = _LearningRates()
    trainer = Trainer(model=model, args=training_arguments(config, ds_config, config.save_path + ".trainer"),
                      train_dataset=list(samples), data_collator=functools.partial(pad_batch, pad_token_id=pad_token_id),
                      callbacks=[rates, *([FrozenWeightsCallback(frozen)] if frozen is not None else []),
                                 *([TrackerCallback(tracker)] if tracker is not None else [])])
    trainer.train()
    model.eval()
    losses = [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    state = RunState(int(trainer.state.global_step), losses, rates.rates)
    return build_report(model, start, frozen, partitioned, state, zero_stage, config, settings, started)
