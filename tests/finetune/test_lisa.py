"""Lisa (Huang et al. 2024): the state schedule, the proximal step against the term written into the loss (autograd
here), ρ = 0 with no alignment steps equal to plain fine-tuning bit for bit, and the alternation on the demo."""
from __future__ import annotations

import json

import torch

from helpers import weights
from safeneurons import cli
from safeneurons.finetune.lisa import PAPER_STEPS, ProximalTerm, aligning, alignment_index

COMMON = ["finetune", "--model", "demo", "--data", "demo-utility", "--nsamples", "16", "--batch-size", "2",
          "--max-length", "64", "--num-epochs", "1", "--learning-rate", "1e-3"]


def test_the_states_alternate_alignment_first():
    assert [aligning(step, (2, 3)) for step in range(10)] == [True, True, False, False, False] * 2
    assert not any(aligning(step, (0, 4)) for step in range(8))


def test_alignment_steps_take_successive_alignment_batches():
    """The paper's setting (100 + 900, 10,000 steps): the 1,000 alignment steps take batches 0..999 of the
    alignment data's passes, each once, where the micro-batch's own index would skip most of them."""
    taken = [alignment_index(step, PAPER_STEPS) for step in range(10_000) if aligning(step, PAPER_STEPS)]
    assert taken == list(range(1000))
    assert [alignment_index(step, (2, 3)) for step in range(10)] == [0, 1, 2, 2, 2, 2, 3, 4, 4, 4]
    assert PAPER_STEPS == (100, 900)


def test_the_proximal_step_is_the_gradient_of_the_term_in_the_loss():
    """AdamW after clipping, once with ρ/2‖w − w_switch‖² in the loss (autograd), once with ours added to the
    gradients: the same weights."""
    torch.manual_seed(0)
    inputs = torch.randn(6, 5)
    results = []
    for ours in (False, True):
        torch.manual_seed(1)
        model = torch.nn.Linear(5, 3)
        proximal = ProximalTerm(model, rho=0.7)
        with torch.no_grad():  # move away from the anchor, so the term pulls
            for param in model.parameters():
                param.add_(0.3 * torch.randn_like(param))
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
        loss = model(inputs).square().mean()
        if not ours:
            loss = loss + 0.7 / 2 * sum((param - anchor).square().sum()
                                        for param, anchor in zip(model.parameters(), proximal.anchors))
        loss.backward()
        if ours:
            proximal.add_to_gradients()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        results.append([param.detach().clone() for param in model.parameters()])
    for theirs, mine in zip(*results):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-7)


def test_no_alignment_steps_and_rho_zero_is_plain_fine_tuning_bit_for_bit(tmp_path):
    assert cli.main([*COMMON, "--save-path", str(tmp_path / "plain")]) == 0
    assert cli.main([*COMMON, "--safety-data", "demo-align", "--lisa-steps", "0,1", "--lisa-rho", "0",
                     "--save-path", str(tmp_path / "off")]) == 0
    plain, off = weights(tmp_path / "plain"), weights(tmp_path / "off")
    assert all(torch.equal(off[name].view(torch.int32), plain[name].view(torch.int32)) for name in plain)


def test_lisa_alternates_alignment_and_user_steps_and_the_term_pulls_back(tmp_path):
    """8 steps of 2 + 2: the alignment steps' losses are the alignment data's (not the plain run's at those steps),
    the user steps train on the user data, and ρ > 0 keeps the weights nearer their start than ρ = 0."""
    assert cli.main([*COMMON, "--save-path", str(tmp_path / "plain")]) == 0
    runs = {}
    for rho in ("0", "5"):
        assert cli.main([*COMMON, "--safety-data", "demo-align", "--lisa-steps", "2,2", "--lisa-rho", rho,
                         "--save-path", str(tmp_path / rho)]) == 0
        runs[rho] = json.loads((tmp_path / rho / "freeze_report.json").read_text())
    plain = json.loads((tmp_path / "plain" / "freeze_report.json").read_text())
    assert runs["0"]["steps"] == plain["steps"] == 8
    assert runs["0"]["loss_curve"][:2] != plain["loss_curve"][:2]  # steps 0-1 train on the alignment data
    assert runs["0"]["loss_curve"][:2] == runs["5"]["loss_curve"][:2]  # the term first acts in step 1
    assert runs["5"]["mean_abs_change_free"] < runs["0"]["mean_abs_change_free"]
