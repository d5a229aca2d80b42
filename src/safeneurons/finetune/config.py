"""What a fine-tune is asked (FineTuneConfig, with its extensions' settings) and what it reports (FineTuneResult)."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from safeneurons.errors import SafeneuronsError
from safeneurons.evaluation.refusal_curve import (CURVE_MAX_NEW_TOKENS, DEFAULT_LIMIT, DEFAULT_PROMPTS,
                                                  check_probe_settings)
from safeneurons.finetune.lisa import PAPER_RHO
from safeneurons.runtime.tracking import TrackingConfig

log = logging.getLogger(__name__)

REPORT_FILE = "freeze_report.json"
LATEST_FILE = "latest"
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
TRAINING_DTYPES = ("float32", "bfloat16")
LR_SCHEDULERS = ("constant", "linear", "cosine")  # transformers' get_scheduler names (with warm-up when asked)
SAFETY_SEED_OFFSET = 1_000_003  # the safety batches' permutations are drawn apart from the training data's

RESCORE_MODES = ("union", "replace")
ENGINES = ("loop", "trainer")

# The settings that decide a run's result: a resume that changes one of them is refused (unless overridden).
RUN_KEYS = ("data", "nsamples", "num_epochs", "learning_rate", "batch_size", "gradient_accumulation_steps",
            "max_length", "weight_decay", "max_grad_norm", "seed", "dtype", "add_eos", "masks", "lr_scheduler",
            "warmup_steps", "warmup_ratio", "freeze_strength", "safety_data", "safety_weight", "lora_r",
            "lora_alpha", "lora_targets", "rescore_every", "rescore_mode", "constrained_betas", "lisa_steps", "lisa_rho")


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
    constrained_betas: tuple[float, float, float] | None = None  # token-wise constrained objective (constrained.py)
    lisa_steps: tuple[int, int] | None = None  # Lisa's alignment and fine-tuning steps per cycle (lisa.py)
    lisa_rho: float = PAPER_RHO  # Lisa's proximal weight ρ
    engine: str = "loop"  # "trainer": the same job through transformers.Trainer (trainer.py)
    eval_every: int | None = None  # refusal curve: measure every K optimizer steps (refusal_curve.py)
    eval_prompts: str = DEFAULT_PROMPTS
    eval_limit: int = DEFAULT_LIMIT
    eval_max_new_tokens: int = CURVE_MAX_NEW_TOKENS
    report_to: str = "none"  # experiment tracking (runtime/tracking.py): tensorboard, wandb or none
    logging_dir: str | None = None  # its folder; default save_path/runs
    run_name: str | None = None  # default: the save folder's name
    tracking_group: str | None = None  # a study's runs share one (W&B's group)

    @property
    def tracking(self) -> TrackingConfig:
        return TrackingConfig(self.report_to, self.logging_dir or (f"{self.save_path}/runs" if self.save_path else None),
                              self.run_name or (Path(self.save_path).name if self.save_path else None),
                              self.tracking_group)

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
        from safeneurons.models.loading import parse_dtype

        if parse_dtype(self.dtype) not in (torch.float32, torch.bfloat16):
            raise SafeneuronsError(f"dtype {self.dtype!r} is not supported for fine-tuning: use "
                                   f"{' or '.join(TRAINING_DTYPES)} (fp16 loss scaling would skip steps)")
        if (self.save_every or self.resume) and not self.checkpoint_dir:
            raise SafeneuronsError("--save-every and --resume need --checkpoint-dir")
        if self.keep_checkpoints < 1:
            raise SafeneuronsError(f"--keep-checkpoints {self.keep_checkpoints} must be at least 1")
        self._validate_extensions()
        self.tracking.validate()
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
        if self.constrained_betas is not None and (len(self.constrained_betas) != 3 or
                                                   not all(beta > 0 for beta in self.constrained_betas)):
            raise SafeneuronsError(f"--constrained-betas {self.constrained_betas} must be three positive numbers")
        self._validate_lisa()
        loop_only = {"--safety-data": self.safety_data, "--lora-r": self.lora_r, "--rescore-every": self.rescore_every,
                     "--checkpoint-dir": self.checkpoint_dir, "--eval-every": self.eval_every,
                     "--constrained-betas": self.constrained_betas, "--lisa-steps": self.lisa_steps}
        if self.engine == "trainer" and any(loop_only.values()):
            raise SafeneuronsError(f"--engine trainer does not take {', '.join(k for k, v in loop_only.items() if v)}: "
                                   f"use the built-in loop (--engine loop)")

    def _validate_lisa(self) -> None:
        if self.lisa_steps is None:
            return
        if not self.safety_data:
            raise SafeneuronsError("--lisa-steps alternates with steps on alignment data: give --safety-data")
        if self.lisa_rho < 0:
            raise SafeneuronsError(f"--lisa-rho {self.lisa_rho} must be >= 0")
        if self.checkpoint_dir or self.resume:
            raise SafeneuronsError("--lisa-steps keeps its proximal anchors in memory: it does not checkpoint or "
                                   "resume (--checkpoint-dir, --resume)")

    def check_needs_masks(self, has_masks: bool) -> None:
        """Options that modify a freeze are refused without one."""
        if not has_masks and (self.freeze_strength != 1.0 or self.rescore_every):
            raise SafeneuronsError("--freeze-strength and --rescore-every act on frozen weights: give --masks")


@dataclass
class FineTuneResult:
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
    refusal_curve_seconds: float = 0.0  # of `seconds`, spent measuring the refusal curve (--eval-every)
    cpu_seconds: float = 0.0  # rank 0's process CPU time over the same span (runtime.timing: load barely moves it)
    refusal_curve_cpu_seconds: float = 0.0
    config: dict = field(default_factory=dict)
    run_settings: dict = field(default_factory=dict)  # what the run used (RUN_KEYS, mask source, world size)
    resumed_settings: dict = field(default_factory=dict)  # settings --resume-override changed: their values before
    rescoring: list = field(default_factory=list)  # --rescore-every: the frozen set's updates (dynamic.Rescoring)
    refusal_curve: list = field(default_factory=list)  # --eval-every: [{"step", "refusal_rate"}] (refusal_curve.py)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
