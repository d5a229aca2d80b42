"""Fine-tuning as researchers run it: schedules, activation checkpointing, partial freezing, the safety loss,
LoRA with the safety-critical weights protected, and the HF Trainer path; bit-exact where the guarantee applies."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import (REPO, assert_frozen_identical_free_changed, assert_tracked_like_the_report, make_tiny_llama,
                     random_masks, report, run_expecting_error, run_ranks, weights)
from safeneurons import cli
from safeneurons.finetune.api import FineTuner
from safeneurons.interventions.freezing import freeze

EXAMPLES = [{"prompt": f"How do I paint room {index}?", "response": f"Sure: use {index} coats of paint."}
            for index in range(8)]
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def tuned(tokenizer, masks=None, seed: int = 12, **options) -> tuple[dict[str, torch.Tensor], object]:
    """Weights and report of the in-process loop on a tiny Llama: 8 examples, batch 2, 2 epochs = 8 steps."""
    model = make_tiny_llama(tokenizer, seed=seed)
    settings = dict(num_epochs=2, learning_rate=5e-3, batch_size=2, max_length=32, weight_decay=0.1)
    model = FineTuner(model, tokenizer, masks=masks).fine_tune_model(EXAMPLES, **{**settings, **options})
    return {name: param.detach().clone() for name, param in model.named_parameters()}, model.fine_tune_report


def assert_bit_identical(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name].view(BITS[left[name].dtype]), right[name].view(BITS[right[name].dtype])), name


# --- schedules ----------------------------------------------------------------------------------------------
def expected_rate(kind: str, step: int, total: int, warmup: int, peak: float) -> float:
    """transformers' schedules written out: linear warm-up, then constant, linear or half-cosine decay to 0."""
    if step < warmup:
        return peak * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return peak * {"constant": 1.0, "linear": max(0.0, 1.0 - progress),
                   "cosine": max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))}[kind]


@pytest.mark.parametrize("kind,warmup", [("linear", {"warmup_steps": 2}), ("cosine", {"warmup_ratio": 0.3}),
                                         ("constant", {"warmup_steps": 3})])
def test_learning_rates_follow_the_schedule(demo_tokenizer, kind, warmup):
    _, summary = tuned(demo_tokenizer, lr_scheduler=kind, **warmup)
    steps = warmup.get("warmup_steps") or math.ceil(warmup["warmup_ratio"] * 8)
    assert summary.learning_rates == pytest.approx([expected_rate(kind, step, 8, steps, 5e-3) for step in range(8)],
                                                   rel=1e-12, abs=1e-15)


def test_a_stopped_and_resumed_scheduled_run_equals_the_uninterrupted_one(tiny_with_masks, tmp_path):
    model, masks, _ = tiny_with_masks
    common = ["finetune", "--model", str(model), "--masks", str(masks), "--data", "demo-utility", "--nsamples", "8",
              "--max-length", "32", "--batch-size", "2", "--num-epochs", "2", "--learning-rate", "5e-3",
              "--lr-scheduler", "cosine", "--warmup-steps", "2", "--checkpoint-dir", str(tmp_path / "checkpoints")]
    assert cli.main([*common[:-2], "--save-path", str(tmp_path / "full")]) == 0
    assert cli.main([*common, "--save-every", "3", "--max-steps", "4", "--save-path", str(tmp_path / "stopped")]) == 0
    assert cli.main([*common, "--resume", "--save-path", str(tmp_path / "resumed")]) == 0
    assert_bit_identical(weights(tmp_path / "full"), weights(tmp_path / "resumed"))
    assert report(tmp_path / "resumed")["learning_rates"] == report(tmp_path / "full")["learning_rates"]


# --- activation checkpointing -----------------------------------------------------------------------------------
def test_gradient_checkpointing_trains_the_same_weights(demo_tokenizer):
    model = make_tiny_llama(demo_tokenizer, seed=12)
    masks = random_masks(model)
    plain, _ = tuned(demo_tokenizer, masks)
    checkpointed, summary = tuned(demo_tokenizer, masks, gradient_checkpointing=True)
    assert_bit_identical(plain, checkpointed)
    assert summary.max_abs_change_frozen == 0.0


# --- partial freezing ---------------------------------------------------------------------------------------------
def test_partial_freeze_moves_masked_elements_back_by_the_strength(demo_tokenizer):
    """Against a reference loop written here: AdamW steps, then masked elements lerp(after, before, s)."""
    inputs = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    layer = torch.nn.Linear(5, 4)
    reference = torch.nn.Linear(5, 4)
    reference.load_state_dict(layer.state_dict())
    mask = torch.rand(4, 5, generator=torch.Generator().manual_seed(1)) < 0.5
    frozen = freeze(layer, {"weight": mask}, strength=0.25)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    frozen.attach(optimizer)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        for model, opt in ((layer, optimizer), (reference, reference_optimizer)):
            opt.zero_grad()
            model(inputs).pow(2).sum().backward()
        before = reference.weight.detach().clone()
        optimizer.step()
        reference_optimizer.step()
        with torch.no_grad():
            reference.weight[mask] = torch.lerp(reference.weight[mask], before[mask], 0.25)
    assert torch.equal(layer.weight, reference.weight) and torch.equal(layer.bias, reference.bias)
    assert not torch.equal(layer.weight[mask], frozen.slices["weight"].values)  # they did move


def test_strength_zero_is_plain_training_and_one_is_the_exact_freeze(demo_tokenizer):
    model = make_tiny_llama(demo_tokenizer, seed=12)
    masks = random_masks(model)
    original = {name: param.detach().clone() for name, param in model.named_parameters()}
    plain, _ = tuned(demo_tokenizer)
    zero, _ = tuned(demo_tokenizer, masks, freeze_strength=0.0)
    assert_bit_identical(plain, zero)
    full, summary = tuned(demo_tokenizer, masks, freeze_strength=1.0)
    assert_frozen_identical_free_changed(original, full, masks)
    half, half_summary = tuned(demo_tokenizer, masks, freeze_strength=0.5)
    assert 0.0 < half_summary.max_abs_change_frozen < max(abs(plain[name] - original[name])[masks[name]].max()
                                                          for name in masks)


# --- the safety loss ------------------------------------------------------------------------------------------
def test_safety_loss_weight_zero_is_plain_training_and_a_weight_lowers_the_safety_loss(demo_tokenizer):
    plain, _ = tuned(demo_tokenizer)
    weightless, summary = tuned(demo_tokenizer, safety_data="demo-align", safety_weight=0.0)
    assert_bit_identical(plain, weightless)
    assert len(summary.safety_loss_curve) == summary.steps == 8
    _, weighted = tuned(demo_tokenizer, safety_data="demo-align", safety_weight=1.0)
    assert weighted.loss_curve[0] == summary.loss_curve[0]
    assert sum(weighted.safety_loss_curve[4:]) < sum(summary.safety_loss_curve[4:])


# --- LoRA ---------------------------------------------------------------------------------------------------------
def test_protected_lora_merges_with_masked_elements_bit_identical(demo_tokenizer):
    from safeneurons.finetune.config import FineTuneConfig
    from safeneurons.finetune.lora import add_adapters, merge_adapters

    model = make_tiny_llama(demo_tokenizer, seed=12)
    masks = random_masks(model)
    original = {name: param.detach().clone() for name, param in model.named_parameters()}
    adapted = add_adapters(model, 4, 8.0, ("q_proj", "v_proj", "down_proj"), masks)
    with torch.no_grad():  # B starts at zero: give the adapters a value, as training would
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    tokens = torch.tensor([[1, 5, 9, 14, 3]])
    trained_output = adapted(tokens).logits
    merged = merge_adapters(adapted)
    assert torch.allclose(merged(tokens).logits, trained_output, atol=1e-5)  # the model that trains is saved
    after = dict(merged.named_parameters())
    assert after.keys() == original.keys()
    for name, mask in masks.items():
        adapted_matrix = any(target in name for target in ("q_proj", "v_proj", "down_proj"))
        assert torch.equal(after[name][mask], original[name][mask]), name
        assert torch.equal(after[name][~mask], original[name][~mask]) != adapted_matrix, name
    assert FineTuneConfig(data="").lora_targets == ("q_proj", "v_proj")


def test_lora_cli_protected_against_plain(tiny_with_masks, tmp_path):
    model, masks_file, masks = tiny_with_masks
    common = ["finetune", "--model", str(model), "--data", "demo-utility", "--nsamples", "8", "--max-length", "32",
              "--batch-size", "2", "--learning-rate", "1e-2", "--lora-r", "4", "--lora-targets", "q_proj,v_proj"]
    assert cli.main([*common, "--save-path", str(tmp_path / "plain")]) == 0
    assert cli.main([*common, "--masks", str(masks_file), "--save-path", str(tmp_path / "protected")]) == 0
    original, plain, protected = weights(model), weights(tmp_path / "plain"), weights(tmp_path / "protected")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(plain[name][masks[name]], original[name][masks[name]])
    assert_frozen_identical_free_changed(original, protected, {key: masks[key] for key in masks if
                                                               "q_proj" in key or "v_proj" in key})
    summary = report(tmp_path / "protected")
    assert summary["max_abs_change_frozen"] == 0.0 and summary["max_abs_change_free"] > 0.0


# --- two ranks under ZeRO-3 -------------------------------------------------------------------------------------
ZERO3 = ["--deepspeed", str(REPO / "ds_configs" / "zero3.json"), "--dtype", "bfloat16", "--batch-size", "2",
         "--num-epochs", "2", "--data", "demo-utility", "--nsamples", "16", "--max-length", "48",
         "--learning-rate", "5e-3", "--weight-decay", "0.1", "--lr-scheduler", "linear", "--warmup-steps", "1"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("run", ["trainer", "lora", "dynamic"])
def test_two_ranks_zero3(run, tiny_with_masks, scored_tiny, tmp_path):
    """The HF Trainer with MaskedTrainer's callback and activation checkpointing; protected LoRA with the safety
    loss and the token-wise constrained objective: frozen elements bit-identical in the saved bf16 model. Dynamic
    freezing with a partial freeze: each
    re-scoring, counted over the ranks' partitions, selects exactly the mask's count again (the same per-row
    sparsity), and the union only grows."""
    if run == "dynamic":
        _two_ranks_dynamic(*scored_tiny, tmp_path)
        return
    model, masks_file, masks = tiny_with_masks
    extra = {"trainer": ["--engine", "trainer", "--gradient-checkpointing", "--report-to", "tensorboard"],
             "lora": ["--lora-r", "4", "--lora-targets", "q_proj,v_proj,down_proj", "--safety-data", "demo-align",
                      "--safety-weight", "0.5", "--constrained-betas", "paper"],
             }[run]
    result = run_ranks(["safeneurons.cli", "finetune", "--model", str(model), "--masks", str(masks_file), *ZERO3,
                        *extra, "--save-path", str(tmp_path / "out")], timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = report(tmp_path / "out")
    assert (summary["world_size"], summary["zero_stage"], summary["steps"]) == (2, 3, 8)
    assert summary["learning_rates"][:2] == [0.0, 5e-3]
    trained = weights(tmp_path / "out")
    checked = masks if run != "lora" else {key: mask for key, mask in masks.items()
                                              if any(part in key for part in ("q_proj", "v_proj", "down_proj"))}
    assert_frozen_identical_free_changed(weights(model), trained, checked)
    assert summary["max_abs_change_frozen"] == 0.0
    if run == "lora":
        assert len(summary["safety_loss_curve"]) == 8
    else:  # the Trainer's logs reach the same tracker under the loop's names
        assert_tracked_like_the_report(tmp_path / "out", summary)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("defence", ["lisa", "constrained"])
def test_trained_defences_under_two_ranks_zero3_equal_one_rank(defence, tiny_with_masks, tmp_path):
    """Lisa (its alternation and the proximal gradient on the ZeRO-3 partitions) and the token-wise constrained
    objective (its reference log-probs computed over the ranks) in float32: 2 ranks of 2 samples each train what 1
    rank of 4 does. The losses agree to float rounding; the weights to within 1% of how far training moved them,
    which is as close as AdamW lets two summation orders come (its first steps move each weight by about ±lr
    whatever the gradient's size). The frozen elements are bit-identical in both."""
    model, masks_file, masks = tiny_with_masks
    options = {"lisa": ["--safety-data", "demo-align", "--lisa-steps", "1,2", "--lisa-rho", "1"],
               "constrained": ["--constrained-betas", "paper"]}[defence]
    common = ["finetune", "--model", str(model), "--masks", str(masks_file), "--data", "demo-utility", "--nsamples",
              "16", "--num-epochs", "1", "--max-length", "48", "--learning-rate", "1e-3", *options]
    result = run_ranks(["safeneurons.cli", *common, "--batch-size", "2", "--deepspeed",
                        str(REPO / "ds_configs" / "zero3.json"), "--save-path", str(tmp_path / "two")], timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert cli.main([*common, "--batch-size", "4", "--save-path", str(tmp_path / "one")]) == 0
    two, one = report(tmp_path / "two"), report(tmp_path / "one")
    assert (two["world_size"], two["zero_stage"], one["world_size"], two["steps"]) == (2, 3, 1, 4)
    assert two["loss_curve"] == pytest.approx(one["loss_curve"], rel=1e-5)
    original, trained_two, trained_one = weights(model), weights(tmp_path / "two"), weights(tmp_path / "one")
    for trained in (trained_two, trained_one):
        assert_frozen_identical_free_changed(original, trained, masks)
    apart = max(float((trained_two[name] - trained_one[name]).abs().max()) for name in original)
    assert apart < 0.01 * one["max_abs_change_free"], (apart, one["max_abs_change_free"])


# --- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options,message", [
    (["--freeze-strength", "1.5", "--masks", "{masks}"], "--freeze-strength 1.5 must be in [0, 1]"),
    (["--rescore-every", "0", "--masks", "{masks}"], "--rescore-every 0 must be a positive"),
    (["--lora-r", "4", "--lora-targets", "qkv"], "--lora-targets qkv match no Linear module"),
    (["--lr-scheduler", "cosine_restarts"], "--lr-scheduler 'cosine_restarts' is not one of"),
    (["--safety-data", "demo-align", "--safety-weight", "-1"], "--safety-weight -1.0 must be >= 0"),
    (["--freeze-strength", "0.5"], "give --masks"),
    (["--engine", "trainer", "--lora-r", "2"], "--engine trainer does not take --lora-r"),
    (["--constrained-betas", "0.5,0,1"], "--constrained-betas '0.5,0,1': expected 'paper' or three positive"),
    (["--engine", "trainer", "--constrained-betas", "paper"], "--engine trainer does not take --constrained-betas"),
    (["--lisa-steps", "2,2"], "--lisa-steps alternates with steps on alignment data: give --safety-data"),
    (["--lisa-steps", "2,2", "--safety-data", "demo-align", "--lisa-rho", "-1"], "--lisa-rho -1.0 must be >= 0"),
    (["--lisa-steps", "2"], "--lisa-steps '2': expected 'paper' or A,F"),
])
def test_bad_training_options_fail_before_the_model_loads(options, message, workspace, capsys, no_model_load):
    command = ["finetune", "--model", "demo", "--data", "demo-utility", *options, "--save-path",
               str(workspace / "out")]
    assert message in run_expecting_error(command, workspace, capsys)
    assert not (workspace / "out").exists()


# --- dynamic freezing ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scored_tiny(tiny_with_masks, tmp_path_factory):
    """The tiny model's wandg masks (5%, demo-align) with their score_summary.json."""
    model, _, _ = tiny_with_masks
    out = tmp_path_factory.mktemp("scored") / "masks"
    assert cli.main(["score", "--model", str(model), "--method", "wandg", "--data", "demo-align", "--nsamples", "8",
                     "--max-length", "32", "--sparsity-ratio", "0.05", "--out", str(out)]) == 0
    return model, out


def frozen_set(checkpoint) -> dict[str, torch.Tensor]:
    from safeneurons.masks.bits import unpack_bits

    state = torch.load(checkpoint / "frozen_set_rank0.pt", weights_only=True)
    return {name: unpack_bits(packed, length) for name, (packed, length) in state["masks"].items()}


def selection_of(checkpoint, model_dir, masks_dir) -> dict[str, torch.Tensor]:
    """The selection an independent `score_model` makes on a checkpoint's weights, flattened."""
    from safeneurons.models.loading import load_model, load_tokenizer
    from safeneurons.scores.config import config_from_summary, summary_beside
    from safeneurons.scores.schedules import score_model

    model = load_model(str(model_dir))
    model.load_state_dict(torch.load(checkpoint / "state.pt", weights_only=True)["model"])
    result = score_model(model, load_tokenizer(str(model_dir)), config_from_summary(summary_beside(masks_dir)))
    return {name: mask.reshape(-1) for name, mask in result.masks.items()}


@pytest.mark.parametrize("mode", ["union", "replace"])
def test_dynamic_freezing_updates_the_frozen_set_as_specified(mode, scored_tiny, tmp_path):
    model, masks_dir = scored_tiny
    common = ["finetune", "--model", str(model), "--masks", str(masks_dir), "--data", "demo-utility", "--nsamples",
              "16", "--max-length", "32", "--batch-size", "2", "--learning-rate", "2e-2", "--num-epochs", "1",
              "--rescore-every", "3", "--rescore-mode", mode, "--save-every", "3", "--keep-checkpoints", "5"]
    checkpoints = tmp_path / "checkpoints"
    assert cli.main([*common, "--checkpoint-dir", str(checkpoints), "--save-path", str(tmp_path / "full")]) == 0
    history = report(tmp_path / "full")["rescoring"]
    assert [record["step"] for record in history] == [3, 6]
    initial = {name: mask.reshape(-1) for name, mask in load_masks_of(masks_dir).items()}
    before = initial
    for record, step in zip(history, (3, 6)):
        selected = selection_of(checkpoints / f"step-{step}", model, masks_dir)
        expected = {name: before[name] | selected[name] if mode == "union" else selected[name] for name in selected}
        after = frozen_set(checkpoints / f"step-{step}")
        assert all(torch.equal(after[name], expected[name]) for name in expected), step
        assert record["frozen"] == sum(int(mask.sum()) for mask in expected.values())
        assert record["released"] == sum(int((before[name] & ~expected[name]).sum()) for name in expected)
        before = expected
    # elements frozen at step 6 keep their step-6 values; union keeps the initial mask at the original values
    final, at_six = weights(tmp_path / "full"), torch.load(checkpoints / "step-6" / "state.pt")["model"]
    for name, mask in before.items():
        assert torch.equal(final[name].reshape(-1)[mask], at_six[name].reshape(-1)[mask]), name
        assert not torch.equal(final[name].reshape(-1)[~mask], at_six[name].reshape(-1)[~mask]), name
        if mode == "union":
            assert torch.equal(final[name].reshape(-1)[initial[name]], weights(model)[name].reshape(-1)[initial[name]])
    # a run stopped at step 5 and resumed from its step-3 checkpoint ends with the same weights
    resumed = tmp_path / "again"
    assert cli.main([*common, "--checkpoint-dir", str(resumed), "--max-steps", "5", "--save-path",
                     str(tmp_path / "stopped")]) == 0
    assert cli.main([*common, "--checkpoint-dir", str(resumed), "--resume", "--save-path", str(tmp_path / "resumed")]) == 0
    assert_bit_identical(weights(tmp_path / "full"), weights(tmp_path / "resumed"))
    assert report(tmp_path / "resumed")["rescoring"] == history


def load_masks_of(folder) -> dict[str, torch.Tensor]:
    from safeneurons.masks.io import load_masks

    return load_masks(folder)


def _two_ranks_dynamic(model, masks_dir, tmp_path) -> None:
    result = run_ranks(["safeneurons.cli", "finetune", "--model", str(model), "--masks", str(masks_dir), *ZERO3,
                        "--freeze-strength", "0.5", "--rescore-every", "3", "--save-path", str(tmp_path / "out")],
                       timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = report(tmp_path / "out")
    initial = sum(int(mask.sum()) for mask in load_masks_of(masks_dir).values())
    history = summary["rescoring"]
    assert [record["step"] for record in history] == [3, 6]
    assert all(record["selected"] == initial and record["released"] == 0 for record in history)
    assert initial <= history[0]["frozen"] <= history[1]["frozen"] == summary["frozen_count"]
    assert all(record["kept"] + record["added"] == record["frozen"] for record in history)
    assert summary["max_abs_change_frozen"] > 0.0  # s = 0.5 lets masked elements move
