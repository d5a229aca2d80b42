"""`safeneurons finetune` end to end: ZeRO-3 on 2 ranks (bf16, weight decay 0.1, clipping, accumulation) with a
random mask, checkpoint/resume, the single-process loop, the saved HF folder, the Python API and the Trainer."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import (REPO, assert_frozen_identical_free_changed, assert_tracked_like_the_report, make_tiny_llama,
                     random_masks, report, run_ranks, tensorboard_scalars, weights)
from safeneurons import cli
from safeneurons.errors import SafeneuronsError
from safeneurons.masks.io import save_masks

DATA = ["--data", "demo-utility", "--nsamples", "16", "--max-length", "48"]
TRAINING = ["--weight-decay", "0.1", "--max-grad-norm", "0.5", "--learning-rate", "5e-3", "--seed", "3"]
# 16 samples, 2 per rank, 2 ranks, 2 accumulation steps: 2 optimizer steps per epoch, 4 in all
ZERO3 = ["--deepspeed", str(REPO / "ds_configs" / "zero3.json"), "--dtype", "bfloat16", "--batch-size", "2",
         "--gradient-accumulation-steps", "2", "--num-epochs", "2", "--lr-scheduler", "cosine", "--warmup-steps", "1"]


def finetune_ranks(model: Path, masks: Path, save: Path, *extra: str) -> str:
    result = run_ranks(["safeneurons.cli", "finetune", "--model", str(model), "--masks", str(masks), *DATA,
                        *TRAINING, *ZERO3, "--save-path", str(save), *extra], timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


@pytest.fixture(scope="module")
def zero3_runs(tiny_with_masks, tmp_path_factory) -> dict[str, Path]:
    """Three 2-rank ZeRO-3 runs: uninterrupted; stopped at step 3, after the step-2 checkpoint (step 3's work is
    lost, as in a run killed then); resumed from that checkpoint."""
    model, masks, _ = tiny_with_masks
    root = tmp_path_factory.mktemp("zero3")
    (root / "full.log").write_text(finetune_ranks(model, masks, root / "full", "--report-to", "tensorboard"))
    finetune_ranks(model, masks, root / "stopped", "--checkpoint-dir", str(root / "checkpoints"),
                   "--save-every", "2", "--max-steps", "3")
    finetune_ranks(model, masks, root / "resumed", "--checkpoint-dir", str(root / "checkpoints"), "--resume")
    return {"full": root / "full", "stopped": root / "stopped", "resumed": root / "resumed"}


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_two_ranks_frozen_identical_free_changed(zero3_runs, tiny_with_masks):
    model, _, masks = tiny_with_masks
    trained = weights(zero3_runs["full"])
    assert all(tensor.dtype == torch.bfloat16 for tensor in trained.values())
    assert_frozen_identical_free_changed(weights(model), trained, masks)
    summary = report(zero3_runs["full"])
    assert summary["max_abs_change_frozen"] == 0.0
    assert summary["max_abs_change_free"] > 0.0
    assert summary["frozen_count"] == sum(int(mask.sum()) for mask in masks.values())
    assert (summary["world_size"], summary["zero_stage"], summary["steps"]) == (2, 3, 4)
    assert len(summary["loss_curve"]) == 4
    warnings = [line for line in (zero3_runs["full"].parent / "full.log").read_text().splitlines()
                if "Warning:" in line]
    assert warnings and all(warnings.count(line) <= 2 for line in warnings)  # each distinct warning once a rank
    assert_tracked_like_the_report(zero3_runs["full"], summary)
    rates = tensorboard_scalars(zero3_runs["full"] / "runs")["train/learning_rate"]
    assert rates == [(step, torch.tensor(rate).float().item()) for step, rate in enumerate(summary["learning_rates"], 1)]


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_each_rank_holds_half_of_the_packed_mask(zero3_runs, tiny_with_masks):
    _, _, masks = tiny_with_masks
    # rank r keeps bits of elements [r*ceil(n/2), (r+1)*ceil(n/2)) of each parameter, 8 per byte
    per_rank = sum(-(-(-(-mask.numel() // 2)) // 8) for mask in masks.values())
    whole = sum(-(-mask.numel() // 8) for mask in masks.values())
    assert report(zero3_runs["full"])["mask_bytes_per_rank"] == [per_rank, per_rank]
    assert per_rank <= whole / 2 + len(masks)
    value_bytes = report(zero3_runs["full"])["mask_value_bytes_per_rank"]
    assert sum(value_bytes) == 2 * sum(int(mask.sum()) for mask in masks.values())  # bf16 values, split by rank


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_resumed_run_ends_with_the_uninterrupted_weights(zero3_runs):
    assert report(zero3_runs["stopped"])["steps"] == 3
    resumed, full = weights(zero3_runs["resumed"]), weights(zero3_runs["full"])
    assert resumed.keys() == full.keys()
    for name in full:
        assert torch.equal(resumed[name], full[name]), name
    summary = report(zero3_runs["resumed"])
    assert summary["resumed_from_step"] == 2
    assert summary["loss_curve"] == report(zero3_runs["full"])["loss_curve"]
    assert summary["learning_rates"] == report(zero3_runs["full"])["learning_rates"]
    assert summary["learning_rates"] == pytest.approx([0.0, 5e-3, 3.75e-3, 1.25e-3])  # cosine, 1 warm-up step
    assert summary["max_abs_change_frozen"] == 0.0


@pytest.mark.slow
def test_zero2_bf16_one_rank_restores_the_fp32_master_fragment(tiny_with_masks, tmp_path):
    """ZeRO stages 1-2 keep an fp32 master partition beside the bf16 weights (`_hp_mapping`); the report's
    frozen change also covers it (a variant that skips restoring it reports about 4e-3 here)."""
    model, masks_file, masks = tiny_with_masks
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config["zero_optimization"] = {"stage": 2, "overlap_comm": False, "contiguous_gradients": True}
    (tmp_path / "zero2.json").write_text(json.dumps(config))
    result = run_ranks(["safeneurons.cli", "finetune", "--model", str(model), "--masks", str(masks_file), *DATA,
                        *TRAINING, *ZERO3[2:], "--deepspeed", str(tmp_path / "zero2.json"),
                        "--save-path", str(tmp_path / "out")], nproc=1, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_frozen_identical_free_changed(weights(model), weights(tmp_path / "out"), masks)
    summary = report(tmp_path / "out")
    assert (summary["zero_stage"], summary["max_abs_change_frozen"], summary["steps"]) == (2, 0.0, 8)


@pytest.mark.slow
def test_single_process_cli_saves_a_loadable_model(tiny_with_masks, tmp_path):
    from transformers import AutoModelForCausalLM

    model, masks_file, masks = tiny_with_masks
    code = cli.main(["finetune", "--model", str(model), "--masks", str(masks_file), *DATA, *TRAINING,
                     "--batch-size", "4", "--gradient-accumulation-steps", "2", "--max-steps", "2",
                     "--save-path", str(tmp_path / "out")])
    assert code == 0
    assert_frozen_identical_free_changed(weights(model), weights(tmp_path / "out"), masks)
    summary = report(tmp_path / "out")
    assert (summary["max_abs_change_frozen"], summary["world_size"], summary["zero_stage"]) == (0.0, 1, None)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(loaded.model.norm.weight.detach(), weights(tmp_path / "out")["model.norm.weight"])
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.slow
def test_single_process_resume_equals_uninterrupted_run(tiny_with_masks, tmp_path):
    model, masks_file, _ = tiny_with_masks
    common = ["finetune", "--model", str(model), "--masks", str(masks_file), *DATA, *TRAINING, "--batch-size", "4",
              "--num-epochs", "2"]  # 4 steps per epoch, 8 in all
    checkpoints = ["--checkpoint-dir", str(tmp_path / "checkpoints")]
    assert cli.main([*common, "--save-path", str(tmp_path / "full")]) == 0
    assert cli.main([*common, *checkpoints, "--save-every", "3", "--max-steps", "4",
                     "--save-path", str(tmp_path / "stopped")]) == 0
    assert cli.main([*common, *checkpoints, "--resume", "--save-path", str(tmp_path / "resumed")]) == 0
    full, resumed = weights(tmp_path / "full"), weights(tmp_path / "resumed")
    assert all(torch.equal(resumed[name], full[name]) for name in full)
    assert report(tmp_path / "resumed")["resumed_from_step"] == 3
    assert report(tmp_path / "resumed")["loss_curve"] == report(tmp_path / "full")["loss_curve"]


def test_bad_mask_is_refused_naming_the_parameter(tiny_with_masks, tmp_path, capsys):
    model, _, masks = tiny_with_masks
    bad = dict(masks)
    bad["model.layers.1.mlp.up_proj.weight"] = torch.zeros(5, 5, dtype=torch.bool)
    save_masks(bad, tmp_path / "bad")
    code = cli.main(["finetune", "--model", str(model), "--masks", str(tmp_path / "bad"), *DATA,
                     "--save-path", str(tmp_path / "out")])
    assert code == 2
    error = capsys.readouterr().err
    assert "model.layers.1.mlp.up_proj.weight" in error and "(5, 5)" in error
    assert not (tmp_path / "out").exists()


def test_fine_tuner_api_and_trainer_callback_freeze(demo_tokenizer, tmp_path):
    """The original `FineTuner(model, tokenizer).fine_tune_model(...)`, and `MaskedTrainer` (an HF Trainer with
    `FrozenWeightsCallback`)."""
    from transformers import TrainingArguments

    from safeneurons.data.samples import load_samples
    from safeneurons.finetune.api import FineTuner
    from safeneurons.finetune.trainer import MaskedTrainer

    model = make_tiny_llama(demo_tokenizer, seed=12)
    masks = random_masks(model, seed=6)
    original = {name: param.detach().clone() for name, param in model.named_parameters()}
    examples = [{"prompt": f"How do I paint room {index}?", "response": "Sure, here is how."} for index in range(8)]
    tuned = FineTuner(model, demo_tokenizer, masks=masks).fine_tune_model(
        examples, num_epochs=1, learning_rate=5e-3, batch_size=4, max_length=32, save_path=str(tmp_path / "api"),
        weight_decay=0.1)
    summary = tuned.fine_tune_report
    assert tuned is model and summary.steps == 2 and summary.max_abs_change_frozen == 0.0
    assert_frozen_identical_free_changed(original, weights(tmp_path / "api"), masks)

    model = make_tiny_llama(demo_tokenizer, seed=12)
    samples = load_samples("demo-utility", demo_tokenizer, 8, 0, 48)
    dataset = [{"input_ids": sample.input_ids, "labels": sample.labels} for sample in samples]
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=1, max_steps=3,
                             learning_rate=5e-3, weight_decay=0.1, report_to=[], save_strategy="no",
                             use_cpu=True, logging_strategy="no")
    trainer = MaskedTrainer(model=model, args=args, train_dataset=dataset, masks=masks)
    trainer.train()
    trained = {name: param.detach() for name, param in model.named_parameters()}
    assert_frozen_identical_free_changed(original, trained, masks)


def test_resume_refuses_changed_settings_and_other_world_sizes(tiny_with_masks, tmp_path, capsys):
    """A resume that changes a run setting is refused naming it (before any weight loads), --resume-override
    allows it and the report keeps the old value; old checkpoints beyond --keep-checkpoints are deleted."""
    from safeneurons.finetune.resume import SETTINGS_FILE, check_resume

    model, masks_file, _ = tiny_with_masks
    base = ["finetune", "--model", str(model), "--masks", str(masks_file), *DATA, *TRAINING, "--batch-size", "4",
            "--checkpoint-dir", str(tmp_path / "ck")]
    assert cli.main([*base, "--save-every", "1", "--keep-checkpoints", "2", "--max-steps", "3",
                     "--save-path", str(tmp_path / "a")]) == 0
    assert sorted(path.name for path in (tmp_path / "ck").glob("step-*")) == ["step-2", "step-3"]
    changed = [arg if arg != "5e-3" else "1e-3" for arg in base]  # --learning-rate 5e-3 -> 1e-3
    capsys.readouterr()
    assert cli.main([*changed, "--resume", "--save-path", str(tmp_path / "b")]) == 2
    error = capsys.readouterr().err
    assert "learning_rate: 0.005 then, 0.001 now" in error and "--resume-override learning_rate" in error
    assert len(error.strip().splitlines()) == 1 and not (tmp_path / "b").exists()
    assert cli.main([*changed, "--resume", "--resume-override", "learning_rate", "--save-path", str(tmp_path / "b")]) == 0
    summary = report(tmp_path / "b")
    assert summary["resumed_from_step"] == 3 and summary["run_settings"]["learning_rate"] == 1e-3
    assert summary["resumed_settings"] == {"learning_rate": 5e-3}
    settings = json.loads((tmp_path / "ck" / "step-3" / SETTINGS_FILE).read_text())
    with pytest.raises(SafeneuronsError, match="written by 1 rank.*this run has 2"):
        check_resume(tmp_path / "ck", {**settings, "world_size": 2}, ())


def test_resume_compares_what_the_masks_are_not_how_their_path_is_spelled(tiny_with_masks, tmp_path, monkeypatch,
                                                                         demo_tokenizer):
    from safeneurons.finetune.config import FineTuneConfig
    from safeneurons.finetune.resume import SETTINGS_FILE, check_resume, run_settings
    from safeneurons.runtime.resume import write_marker

    model, masks_file, _ = tiny_with_masks
    config = FineTuneConfig(data="demo-utility")
    saved = run_settings(config, masks_file.resolve())
    write_marker(tmp_path / "ck" / "step-1" / SETTINGS_FILE, saved)
    monkeypatch.chdir(masks_file.parent.parent)
    relative = Path(masks_file.parent.name) / masks_file.name
    check_resume(tmp_path / "ck", run_settings(config, relative), ())  # the same file, spelled otherwise
    shutil.copytree(masks_file.parent, tmp_path / "copy")
    check_resume(tmp_path / "ck", run_settings(config, tmp_path / "copy" / masks_file.name), ())  # the same masks
    save_masks(random_masks(make_tiny_llama(demo_tokenizer, seed=11), seed=6), tmp_path / "other")
    with pytest.raises(SafeneuronsError, match="--resume would change the run's settings \\(masks: "):
        check_resume(tmp_path / "ck", run_settings(config, tmp_path / "other" / "masks.safetensors"), ())
    # a checkpoint of the previous version recorded the path as it was given
    write_marker(tmp_path / "ck" / "step-1" / SETTINGS_FILE, {**saved, "masks": str(relative)})
    check_resume(tmp_path / "ck", run_settings(config, masks_file.resolve()), ())


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.slow
@pytest.mark.distributed
def test_a_rank_killed_mid_run_resumes_to_the_uninterrupted_weights(tiny_with_masks, tmp_path):
    """The fault test: 2 ranks under ZeRO-3, one rank SIGKILLed after the step-3 checkpoint; the job ends, a
    resume finishes the run, and the weights equal those of a run that was never interrupted, bit for bit."""
    import os
    import signal
    import subprocess
    import sys
    import time

    model, masks, _ = tiny_with_masks
    args = ["safeneurons.cli", "finetune", "--model", str(model), "--masks", str(masks), "--data", "demo-utility",
            "--nsamples", "64", "--max-length", "48", *TRAINING, *ZERO3, "--checkpoint-dir", str(tmp_path / "ck"),
            "--save-every", "1"]
    full = run_ranks([*args[:-4], "--save-path", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr[-3000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "SAFENEURONS_TIMEOUT": "60"}
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            "-m", *args, "--save-path", str(tmp_path / "killed")], env=env, cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (tmp_path / "ck" / "step-3" / "run_settings.json").is_file():
        assert job.poll() is None and time.monotonic() < deadline, "the run ended before its step-3 checkpoint"
        time.sleep(0.05)
    ranks = _children(job.pid)
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGKILL)
    assert job.wait(timeout=120) != 0 and not (tmp_path / "killed").exists()
    resumed = run_ranks([*args, "--resume", "--save-path", str(tmp_path / "resumed")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = report(tmp_path / "resumed")
    assert summary["resumed_from_step"] >= 3 and summary["steps"] == report(tmp_path / "full")["steps"] == 16
    final, uninterrupted = weights(tmp_path / "resumed"), weights(tmp_path / "full")
    assert all(torch.equal(final[name], uninterrupted[name]) for name in uninterrupted)
    assert summary["loss_curve"] == report(tmp_path / "full")["loss_curve"]
