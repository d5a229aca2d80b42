"""Token-wise constrained fine-tuning (Qi et al. 2024, *Safety Alignment Should Be Made More Than Just a Few Tokens
Deep*, arXiv 2406.05946, their eq. 3): each response token's log-probability may leave the aligned model's only at a
price that is steepest on the first tokens,

    loss = mean over response tokens t of  −(2 / β_t) · log σ(β_t · (log π_θ(y_t | x, y_<t) − log π_aligned(y_t | …)))

with the paper's schedule β_1 = 0.5, β_t = 2 for 2 ≤ t ≤ 5 and β_t = 0.1 after. As β → 0 its gradient becomes the
cross-entropy's (the plain fine-tuning objective); large β holds the token's probability at the aligned model's.
The aligned model's log-probabilities are those of the model before the first step, computed once, one sample per
pass (so they do not depend on batching or on the number of ranks).

The gradient is the authors' (Unispac/shallow-vs-deep-alignment, `trainer.py`): each token's cross-entropy gradient
weighted by 2σ(−β_t Δ_t), floored at `WEIGHT_FLOOR` = 1e-3 as they clamp it, so a token far above the aligned
model's probability still learns a little. The loss we log is the objective above, not their surrogate (weight ×
cross-entropy), whose value is not the objective's. Tokens are averaged within a batch on each rank, and the
ranks' losses are weighted by their share of the step's response tokens (`backends._shared`), so the step's
objective is the mean over all its response tokens, whatever the number of ranks.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from safeneurons.data.examples import IGNORE_INDEX, Sample
from safeneurons.runtime.distributed import map_fixed_batches
from safeneurons.scores.passes import next_token_losses

PAPER_BETAS = (0.5, 2.0, 0.1)  # β for the first response token, for tokens 2–5, and after
EARLY_TOKENS = 5
WEIGHT_FLOOR = 1e-3  # the authors' torch.clamp(weight, min=1e-3) of each token's gradient weight


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, T−1]: log π(y_t) of each next-token label (0 where the label is ignored), in float32."""
    return -next_token_losses(logits, labels)


def token_betas(labels: torch.Tensor, betas: Sequence[float]) -> torch.Tensor:
    """[B, T−1]: β of each next-token label by its position in the response (1 = the response's first token)."""
    valid = labels[:, 1:] != IGNORE_INDEX
    position = valid.long().cumsum(dim=1)
    first, early, rest = betas
    beta = torch.where(position <= EARLY_TOKENS, torch.tensor(early), torch.tensor(rest))
    return torch.where(position == 1, torch.tensor(first), beta).to(torch.float32)


def constrained_loss(logits: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor,
                     betas: Sequence[float], weight_floor: float = WEIGHT_FLOOR) -> torch.Tensor:
    """The objective above for a batch (`reference` holds the aligned model's `token_logprobs` [B, T−1]), whose
    value is the objective and whose gradient weights each token's cross-entropy gradient by
    max(2σ(−βΔ), weight_floor), as the authors' surrogate does."""
    valid = labels[:, 1:] != IGNORE_INDEX
    beta = token_betas(labels, betas).to(logits.device)
    logprobs = token_logprobs(logits, labels)
    delta = logprobs - reference.to(logits.device)
    objective = -(2.0 / beta) * F.logsigmoid(beta * delta)
    weight = (2.0 * torch.sigmoid(-beta * delta)).clamp(min=weight_floor).detach()
    surrogate = -weight * logprobs
    per_token = surrogate + (objective - surrogate).detach()  # the objective's value, the floored gradient
    return per_token[valid].sum() / valid.sum().clamp(min=1)


def reference_logprobs(model: nn.Module, samples: Sequence[Sample], device: torch.device) -> list[torch.Tensor]:
    """Each sample's `token_logprobs` under `model` as it is now (CPU, float32), one sample per pass, the passes
    split across ranks and gathered on every rank (collective; ZeRO-3 safe)."""
    was_training = model.training
    model.eval()

    def run(indices: list[int]) -> list[torch.Tensor]:
        sample = samples[indices[0]]
        with torch.no_grad():
            logits = model(input_ids=sample.input_ids[None].to(device)).logits
        return [token_logprobs(logits, sample.labels[None].to(device))[0].cpu()]

    reference = map_fixed_batches(len(samples), 1, run, "aligned log-probs")
    model.train(was_training)
    return reference


def pad_reference(rows: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """[B, width]: the batch's reference rows, right-padded with 0 as `pad_batch` pads the samples."""
    padded = torch.zeros(len(rows), width)
    for row, values in enumerate(rows):
        padded[row, :len(values)] = values
    return padded
