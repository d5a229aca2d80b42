"""Experiment tracking: a run's metrics to TensorBoard (torch.utils.tensorboard) or Weights & Biases, on rank 0
only, with the run's config attached (`--report-to tensorboard|wandb|none`). Other ranks, and `none`, get a
tracker that does nothing, so that callers log unconditionally.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Mapping

import yaml

from safeneurons.errors import SafeneuronsError
from safeneurons.runtime import distributed

REPORT_TO = ("none", "tensorboard", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
WANDB_PROJECT = "safeneurons"


@dataclass(frozen=True)
class TrackingConfig:
    """Where a run's metrics go: `report_to`, the folder (TensorBoard's event files, W&B's offline run), the run's
    name and its group (a study's runs share one)."""

    report_to: str = "none"
    logging_dir: str | None = None
    run_name: str | None = None
    group: str | None = None

    def validate(self) -> None:
        """Before anything loads: a known name and its package installed."""
        if self.report_to not in REPORT_TO:
            raise SafeneuronsError(f"--report-to {self.report_to!r} is not one of {', '.join(REPORT_TO)}")
        package = PACKAGES.get(self.report_to)
        if package and importlib.util.find_spec(package) is None:
            raise SafeneuronsError(f"--report-to {self.report_to} needs the {package} package: "
                                   f"pip install {package}")
        if self.report_to != "none" and not self.logging_dir:
            raise SafeneuronsError(f"--report-to {self.report_to} needs a logging folder (--logging-dir)")


class Tracker:
    """Does nothing: `none`, and every rank but 0."""

    def log(self, metrics: Mapping[str, float | None], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, config: TrackingConfig, run_config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=config.logging_dir)
        self.writer.add_text("config", "```yaml\n" + _as_yaml(run_config) + "```")

    def log(self, metrics: Mapping[str, float | None], step: int) -> None:
        for name, value in metrics.items():
            if value is not None:
                self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A W&B run; WANDB_MODE=offline keeps it on disk (`wandb sync` uploads it later)."""

    def __init__(self, config: TrackingConfig, run_config: Mapping[str, Any]) -> None:
        import wandb

        self.run = wandb.init(project=WANDB_PROJECT, name=config.run_name, group=config.group,
                              dir=config.logging_dir, config=yaml.safe_load(_as_yaml(run_config)), reinit=True)

    def log(self, metrics: Mapping[str, float | None], step: int) -> None:
        self.run.log({name: value for name, value in metrics.items() if value is not None}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_tracker(config: TrackingConfig, run_config: Mapping[str, Any]) -> Tracker:
    """The tracker of this rank (rank 0's writes; the others' do nothing)."""
    config.validate()
    if config.report_to == "none" or not distributed.is_main():
        return Tracker()
    from pathlib import Path

    Path(config.logging_dir).mkdir(parents=True, exist_ok=True)
    return (TensorBoardTracker if config.report_to == "tensorboard" else WandbTracker)(config, run_config)


def _as_yaml(values: Mapping[str, Any]) -> str:
    """The config as YAML; what YAML cannot hold (tuples, paths) as lists and text."""
    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(key): plain(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)

    return yaml.safe_dump(plain(values), sort_keys=False, allow_unicode=True)
