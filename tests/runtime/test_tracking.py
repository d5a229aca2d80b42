"""Experiment tracking: bad settings fail before anything loads, only rank 0 writes, and a Weights & Biases run
in offline mode holds every step's loss (TensorBoard's event files are read back in the fine-tuning and
pipeline tests)."""
from __future__ import annotations

import importlib.util
import json

import pytest

from safeneurons import cli
from safeneurons.errors import SafeneuronsError
from safeneurons.runtime import distributed, tracking
from safeneurons.runtime.tracking import TrackingConfig, open_tracker


def test_a_tracker_that_cannot_run_fails_before_anything_loads(monkeypatch, tmp_path):
    with pytest.raises(SafeneuronsError, match="--report-to 'mlflow' is not one of none, tensorboard, wandb"):
        TrackingConfig("mlflow", str(tmp_path)).validate()
    with pytest.raises(SafeneuronsError, match="needs a logging folder"):
        TrackingConfig("tensorboard").validate()
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SafeneuronsError, match="--report-to wandb needs the wandb package: pip install wandb"):
        TrackingConfig("wandb", str(tmp_path)).validate()


def test_the_cli_names_a_missing_package_in_one_line_before_the_model_loads(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    code = cli.main(["finetune", "--model", "no-such-org/no-such-model", "--data", "demo-utility",
                     "--save-path", str(tmp_path / "out"), "--report-to", "tensorboard"])
    assert code == 2
    assert capsys.readouterr().err.strip() == ("safeneurons: error: --report-to tensorboard needs the tensorboard "
                                               "package: pip install tensorboard")


def test_only_rank_0_writes(monkeypatch, tmp_path):
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    tracker = open_tracker(TrackingConfig("tensorboard", str(tmp_path / "runs")), {"a": 1})
    tracker.log({"train/loss": 1.0}, 1)
    tracker.close()
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                    reason="wandb is not installed (pip install wandb, or the [tracking] extra): its offline run "
                           "is not checked")
def test_a_wandb_offline_run_holds_every_step_and_the_config(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    save = tmp_path / "tuned"
    assert cli.main(["finetune", "--model", "demo", "--data", "demo-utility", "--nsamples", "8", "--batch-size", "4",
                     "--max-length", "48", "--num-epochs", "1", "--save-path", str(save), "--report-to", "wandb"]) == 0
    runs = list((save / "runs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    record = runs[0].read_bytes()  # W&B's own reader lives in its Go core; the values are JSON inside the records
    losses = json.loads((save / "freeze_report.json").read_text())["loss_curve"]
    assert len(losses) == 2 and b"train/loss" in record
    assert all(json.dumps(loss).encode() in record for loss in losses)
    assert b"report_to" in record and b"demo-utility" in record
