"""The two training backends behind one interface: a plain torch loop (AdamW) and a DeepSpeed engine."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Protocol, Sequence

import torch
from torch import nn

from safeneurons.data.examples import IGNORE_INDEX
from safeneurons.errors import SafeneuronsError
from safeneurons.finetune.config import ADAM_BETAS, ADAM_EPS, LATEST_FILE
from safeneurons.finetune.constrained import constrained_loss
from safeneurons.finetune.schedule import make_scheduler
from safeneurons.runtime import distributed
from safeneurons.runtime.outputs import atomic_file

if TYPE_CHECKING:
    from safeneurons.finetune.config import FineTuneConfig


class TrainingBackend(Protocol):
    module: nn.Module
    zero_stage: int | None
    before_update: Callable[[], None] | None

    def micro_step(self, batch: Mapping[str, torch.Tensor], boundary: bool,
                   safety_batch: Mapping[str, torch.Tensor] | None = None) -> tuple[float, float | None]: ...

    def learning_rate(self) -> float: ...

    def grad_norm(self) -> float | None: ...

    def save_checkpoint(self, directory: Path, step: int, client_state: dict) -> None: ...

    def load_checkpoint(self, directory: Path, tag: str) -> dict: ...


def _adamw(parameters: Sequence[nn.Parameter], config: FineTuneConfig) -> torch.optim.AdamW:
    """AdamW with the betas and eps of ds_configs/zero3.json, weight decay on every parameter."""
    return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay, betas=ADAM_BETAS,
                             eps=ADAM_EPS)


def token_share(labels: torch.Tensor) -> float:
    """Under N ranks, N × this rank's share of the micro-batch's response tokens (1 on one rank). A rank's loss is
    the mean over its own tokens and the ranks' gradients are averaged: scaled by this, the average is the mean over
    all the micro-batch's tokens, as one rank taking the whole micro-batch computes it."""
    world = distributed.world_size()
    if world == 1:
        return 1.0
    tokens = float((labels[:, 1:] != IGNORE_INDEX).sum())
    return tokens * world / max(distributed.reduce_over_ranks(tokens), 1.0)


def _losses(module: nn.Module, batch: Mapping[str, torch.Tensor], safety_batch: Mapping[str, torch.Tensor] | None,
            config: FineTuneConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(objective, task loss, safety loss): the objective adds safety_weight × the loss on the safety batch; a batch
    with the aligned model's `reference_logprobs` takes the token-wise constrained loss instead of cross-entropy.
    Each loss is weighted by its `token_share`, so that the number of ranks does not change the objective."""
    if "reference_logprobs" in batch:
        inputs = {key: value for key, value in batch.items() if key not in ("labels", "reference_logprobs")}
        loss = constrained_loss(module(**inputs).logits, batch["labels"], batch["reference_logprobs"],
                                config.constrained_betas)
    else:
        loss = module(**batch).loss
    loss = _shared(loss, batch["labels"])
    if safety_batch is None:
        return loss, loss, None
    safety_loss = _shared(module(**safety_batch).loss, safety_batch["labels"])
    return loss + config.safety_weight * safety_loss, loss, safety_loss


def _shared(loss: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    share = token_share(labels)
    return loss if share == 1.0 else loss * share


def _floats(loss: torch.Tensor, safety_loss: torch.Tensor | None) -> tuple[float, float | None]:
    return float(loss.detach().float()), None if safety_loss is None else float(safety_loss.detach().float())


class TorchBackend:
    """Single-process AdamW loop: loss / accumulation steps, clipping, the step and the schedule at the boundary."""

    zero_stage = None

    def __init__(self, model: nn.Module, config: FineTuneConfig, total_steps: int) -> None:
        self.module, self.config = model, config
        self.optimizer = _adamw([p for p in model.parameters() if p.requires_grad], config)
        self.scheduler = make_scheduler(self.optimizer, config, total_steps)
        self.last_grad_norm: float | None = None
        self.before_update: Callable[[], None] | None = None  # edits the gradients before clipping and the step

    def micro_step(self, batch: Mapping[str, torch.Tensor], boundary: bool,
                   safety_batch: Mapping[str, torch.Tensor] | None = None) -> tuple[float, float | None]:
        objective, loss, safety_loss = _losses(self.module, batch, safety_batch, self.config)
        (objective / self.config.gradient_accumulation_steps).backward()
        if boundary:
            if self.before_update is not None:
                self.before_update()
            self.last_grad_norm = self._clip_gradients()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return _floats(loss, safety_loss)

    def _clip_gradients(self) -> float:
        """The gradients' total norm before clipping (clipped only with max_grad_norm > 0)."""
        if self.config.max_grad_norm > 0:
            return float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.config.max_grad_norm))
        norms = [torch.linalg.vector_norm(p.grad) for p in self.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def grad_norm(self) -> float | None:
        return self.last_grad_norm

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

        from safeneurons.runtime.dsconfig import zero_stage

        self.zero_stage, self.config = zero_stage(ds_config), config
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = None if "optimizer" in ds_config else _adamw(parameters, config)  # a config without one
        # the engine steps the schedule after each optimizer step and keeps it in its checkpoints
        scheduler = None if "scheduler" in ds_config else lambda opt: make_scheduler(opt, config, total_steps)
        self.engine, *_ = deepspeed.initialize(model=model, config=ds_config, model_parameters=parameters,
                                               optimizer=optimizer, lr_scheduler=scheduler)
        self.module = self.engine.module
        self.before_update: Callable[[], None] | None = None  # edits the gradient partitions before the step

    def micro_step(self, batch: Mapping[str, torch.Tensor], boundary: bool,
                   safety_batch: Mapping[str, torch.Tensor] | None = None) -> tuple[float, float | None]:
        objective, loss, safety_loss = _losses(self.engine, batch, safety_batch, self.config)
        self.engine.backward(objective)
        if boundary and self.before_update is not None:
            self.before_update()
        self.engine.step()
        return _floats(loss, safety_loss)

    def learning_rate(self) -> float:
        return float(self.engine.get_lr()[0])

    def grad_norm(self) -> float | None:
        """The engine's global norm of the last step (before clipping); None where it computes none."""
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def save_checkpoint(self, directory: Path, step: int, client_state: dict) -> None:
        self.engine.save_checkpoint(str(directory), tag=f"step-{step}", client_state=client_state)

    def load_checkpoint(self, directory: Path, tag: str) -> dict:
        path, client_state = self.engine.load_checkpoint(str(directory), tag=tag)
        if path is None:
            raise SafeneuronsError(f"--resume: no DeepSpeed checkpoint in {directory}")
        return client_state
