"""Token-wise constrained fine-tuning (Qi et al. 2024): the loss and its gradient against a per-token loop written
here, the paper's β schedule, β → 0 giving cross-entropy's gradient, and the command's run on the demo model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import weights
from safeneurons import cli
from safeneurons.finetune.constrained import PAPER_BETAS, constrained_loss, token_betas, token_logprobs


def batch(seed: int = 0):
    """Logits [2, 9, 11] and labels with prompts of 3 and 2 tokens and one padded position."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 9, 11, generator=generator, requires_grad=True)
    labels = torch.randint(0, 11, (2, 9), generator=generator)
    labels[0, :3], labels[1, :2], labels[1, -1] = -100, -100, -100
    reference = torch.randn(2, 8, generator=generator).clamp(max=-0.1)
    return logits, labels, reference


def reference_loss(logits, labels, reference, betas, surrogate=False) -> torch.Tensor:
    """The paper's objective, one response token at a time: t counts the response's tokens from 1; with
    `surrogate`, the authors' trainer: each token's cross-entropy times its weight 2σ(−βΔ) clamped at 1e-3."""
    terms = []
    for row in range(labels.shape[0]):
        t = 0
        for position in range(1, labels.shape[1]):
            if labels[row, position] == -100:
                continue
            t += 1
            beta = betas[0] if t == 1 else betas[1] if t <= 5 else betas[2]
            logprob = torch.log_softmax(logits[row, position - 1], dim=-1)[labels[row, position]]
            delta = logprob - reference[row, position - 1]
            weight = torch.clamp(2 * torch.sigmoid(-beta * delta), min=1e-3).detach()
            terms.append(-weight * logprob if surrogate else -(2 / beta) * F.logsigmoid(beta * delta))
    return torch.stack(terms).mean()


def test_the_schedule_is_the_papers():
    _, labels, _ = batch()
    betas = token_betas(labels, PAPER_BETAS)
    assert betas[0, 2:].tolist() == pytest.approx([0.5, 2.0, 2.0, 2.0, 2.0, 0.1])  # response tokens 1..6
    assert betas[1, 1].item() == 0.5 and betas[1, 6].item() == pytest.approx(0.1)


@pytest.mark.parametrize("betas", [PAPER_BETAS, (1.0, 3.0, 0.05)])
def test_loss_and_gradient_equal_the_per_token_reference(betas):
    logits, labels, reference = batch()
    ours = constrained_loss(logits, labels, reference, betas)
    (ours_grad,) = torch.autograd.grad(ours, logits)
    theirs = reference_loss(logits, labels, reference, betas)
    (theirs_grad,) = torch.autograd.grad(reference_loss(logits, labels, reference, betas, surrogate=True), logits)
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-6)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-5, atol=1e-7)


def test_the_gradient_weight_is_floored_as_the_authors_clamp_it():
    """Tokens far above the aligned model's probability (2σ(−βΔ) < 1e-3) keep a weight of 1e-3, not ~0."""
    logits, labels, reference = batch()
    reference = reference - 20.0  # Δ ≈ 20: 2σ(−2·20) ≈ 8e-18 on tokens 2–5
    (floored,) = torch.autograd.grad(constrained_loss(logits, labels, reference, PAPER_BETAS), logits)
    (unfloored,) = torch.autograd.grad(constrained_loss(logits, labels, reference, PAPER_BETAS, weight_floor=0.0),
                                       logits)
    (theirs,) = torch.autograd.grad(reference_loss(logits, labels, reference, PAPER_BETAS, surrogate=True), logits)
    torch.testing.assert_close(floored, theirs, rtol=1e-5, atol=1e-9)
    assert floored[0, 3].abs().sum() > 100 * unfloored[0, 3].abs().sum()  # the second response token


def test_small_beta_is_cross_entropy_and_large_beta_holds_the_aligned_probability():
    logits, labels, reference = batch()
    (small,) = torch.autograd.grad(constrained_loss(logits, labels, reference, (1e-4,) * 3), logits)
    cross_entropy = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    (plain,) = torch.autograd.grad(cross_entropy, logits)
    torch.testing.assert_close(small, plain, rtol=1e-3, atol=1e-6)
    # the weight on each token's cross-entropy gradient is 2·σ(−β·Δ): 1 at the aligned log-prob for any β, and for
    # large β the floor 1e-3 once the token is more likely than under the aligned model (held there), 2 while it
    # is less
    aligned = token_logprobs(logits, labels).detach()
    for shift, weight in ((0.0, 1.0), (5.0, 1e-3), (-5.0, 2.0)):
        (grad,) = torch.autograd.grad(constrained_loss(logits, labels, aligned - shift, (50.0,) * 3), logits)
        torch.testing.assert_close(grad, weight * plain, rtol=1e-4, atol=1e-7)


def test_finetune_with_tiny_betas_trains_the_plain_runs_weights(tmp_path):
    common = ["finetune", "--model", "demo", "--data", "demo-utility", "--nsamples", "8", "--batch-size", "4",
              "--max-length", "64", "--num-epochs", "1", "--learning-rate", "1e-3"]
    assert cli.main([*common, "--save-path", str(tmp_path / "plain")]) == 0
    assert cli.main([*common, "--constrained-betas", "1e-6,1e-6,1e-6", "--save-path", str(tmp_path / "tiny")]) == 0
    assert cli.main([*common, "--constrained-betas", "paper", "--save-path", str(tmp_path / "paper")]) == 0
    plain, tiny, paper = (weights(tmp_path / name) for name in ("plain", "tiny", "paper"))
    assert max(float((tiny[name] - plain[name]).abs().max()) for name in plain) < 1e-5
    assert max(float((paper[name] - plain[name]).abs().max()) for name in plain) > 1e-4
