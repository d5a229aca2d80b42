"""Prompt sets and the refusal direction (difference of means at one layer)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from safeneurons.errors import SafeneuronsError
from safeneurons.interp.patching.hooks import keeper, patched_forward
from safeneurons.models.structure import decoder_layers, model_device
from safeneurons.runtime.distributed import map_over_ranks

if TYPE_CHECKING:
    from safeneurons.interp.patching.hooks import RunOutput
    from safeneurons.interp.patching.metrics import Metric


def _run_prompts(model: nn.Module, tokenizer: Any, prompts: Sequence[str],
                 layer: int | None = None) -> tuple[RunOutput, torch.Tensor | None]:
    """One left-padded forward pass of chat-formatted prompts; with `layer`, also that layer's output at the
    last prompt token."""
    device = model_device(model)
    encoded = tokenizer(list(prompts), padding=True, padding_side="left", return_tensors="pt")
    states: dict[str, torch.Tensor] = {}
    keep = keeper(states, "layer", lambda activation: activation[:, -1].detach())
    with torch.no_grad():
        out = patched_forward(model, {} if layer is None else {(layer, "residual"): keep},
                       encoded["input_ids"].to(device), attention_mask=encoded["attention_mask"].to(device))
    return out, states.get("layer")


def prompt_metrics(model: nn.Module, tokenizer: Any, prompts: Sequence[str], metric: Metric,
                   batch_size: int = 16) -> list[float]:
    """The metric of each chat-formatted prompt's own run (prompts split across ranks)."""
    def run_batch(indices: list[int]) -> list[float]:
        out, _ = _run_prompts(model, tokenizer, [prompts[i] for i in indices] or prompts[:1])
        return metric.compute(out.logits, out.residual).tolist()[:len(indices)]

    return map_over_ranks(len(prompts), batch_size, run_batch, desc="metric")


def last_token_residuals(model: nn.Module, tokenizer: Any, prompts: Sequence[str], layer: int,
                         batch_size: int = 16) -> torch.Tensor:
    """[prompts, hidden]: decoder layer `layer`'s output at each prompt's last token (fp32, on the CPU)."""
    def run_batch(indices: list[int]) -> list[torch.Tensor]:
        _, states = _run_prompts(model, tokenizer, [prompts[i] for i in indices] or prompts[:1], layer)
        return list(states.float().cpu()[:len(indices)])

    return torch.stack(map_over_ranks(len(prompts), batch_size, run_batch, desc=f"residuals of layer {layer}"))


@dataclass
class RefusalDirection:
    """Mean residual of harmful minus harmless prompts at the last prompt token of one layer (Arditi et al.)."""

    direction: torch.Tensor  # [hidden], not normalised
    layer: int
    harmful_projection: float  # mean projection of the harmful prompts' residuals on the unit direction
    harmless_projection: float
    n_harmful: int
    n_harmless: int

    def summary(self) -> dict[str, Any]:
        return {"layer": self.layer, "hidden_size": self.direction.numel(), "norm": float(self.direction.norm()),
                "harmful_projection_mean": self.harmful_projection,
                "harmless_projection_mean": self.harmless_projection,
                "n_harmful": self.n_harmful, "n_harmless": self.n_harmless,
                "residual": "output of the decoder layer at the last prompt token, before the final norm"}


def compute_refusal_direction(model: nn.Module, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str],
                              layer: int | None = None, batch_size: int = 16) -> RefusalDirection:
    """Difference of mean residuals; `layer` defaults to the last one, whose output is the final residual that
    the `direction` metric projects."""
    n_layers = len(decoder_layers(model))
    layer = n_layers - 1 if layer is None else layer
    if not 0 <= layer < n_layers:
        raise SafeneuronsError(f"layer {layer} does not exist; the model has layers 0..{n_layers - 1}")
    if not harmful or not harmless:
        raise SafeneuronsError("the refusal direction needs at least one harmful and one harmless prompt")
    harmful_states = last_token_residuals(model, tokenizer, harmful, layer, batch_size)
    harmless_states = last_token_residuals(model, tokenizer, harmless, layer, batch_size)
    direction = harmful_states.mean(0) - harmless_states.mean(0)
    unit = direction / direction.norm()
    return RefusalDirection(direction, layer, float((harmful_states @ unit).mean()),
                            float((harmless_states @ unit).mean()), len(harmful), len(harmless))


def load_direction(path: str | Path) -> torch.Tensor:
    """A refusal direction from `patch --compute-direction` (.pt) or a .safetensors/.pt holding one vector."""
    path = Path(path)
    if not path.is_file():
        raise SafeneuronsError(f"refusal direction file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        loaded: Any = tensors.get("direction", next(iter(tensors.values()), None))
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several unrelated types for a file that is not a checkpoint
            raise SafeneuronsError(f"refusal direction file {path} is not a torch file ({error})") from None
        loaded = loaded.get("direction") if isinstance(loaded, dict) else loaded
    if not isinstance(loaded, torch.Tensor) or loaded.dim() != 1 or not bool(loaded.norm() > 0):
        raise SafeneuronsError(f"{path} holds no non-zero 1-D refusal direction (expected a [hidden] tensor)")
    return loaded.float()
