"""Resuming a fine-tune: the run settings a checkpoint records and the check that they did not change."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from safeneurons.errors import SafeneuronsError
from safeneurons.finetune.config import RUN_KEYS, FineTuneConfig
from safeneurons.masks.io import CHECKSUM_PREFIX, MaskReader
from safeneurons.runtime import distributed
from safeneurons.runtime.resume import changed_settings, read_marker

SETTINGS_FILE = "run_settings.json"


def run_settings(config: FineTuneConfig, masks: Any) -> dict[str, Any]:
    """What a checkpoint records of its run: a mask file by what it holds (the checksums it records, so that
    another spelling of the same path, or a copy, is the same masks) and where it was; in-memory masks by their
    selected count."""
    settings = {key: getattr(config, key) for key in RUN_KEYS if key != "masks"}
    settings["lora_targets"] = list(config.lora_targets)  # as JSON reads it back
    for key in ("constrained_betas", "lisa_steps"):
        settings[key] = None if getattr(config, key) is None else list(getattr(config, key))
    settings["masks"] = None if masks is None else masks_identity(masks) if isinstance(masks, (str, Path)) else \
        f"<in memory: {sum(int(mask.sum()) for mask in masks.values())} elements>" if isinstance(masks, Mapping) \
        else "<frozen weights>"
    if isinstance(masks, (str, Path)):
        settings["masks_path"] = str(Path(masks).resolve())
    return {**settings, "world_size": distributed.world_size()}


def masks_identity(masks: str | Path) -> str:
    """The mask file's fingerprint, or its resolved path when it records no checksums."""
    return MaskReader(masks).fingerprint() or str(Path(masks).resolve())


def _same_masks(saved: Mapping[str, Any], settings: Mapping[str, Any]) -> bool:
    """A checkpoint written before masks were fingerprinted recorded the path as given: the same file counts."""
    recorded, path = saved.get("masks"), settings.get("masks_path")
    if recorded == settings.get("masks"):
        return True
    return isinstance(recorded, str) and path is not None and not recorded.startswith(("<", CHECKSUM_PREFIX)) \
        and Path(recorded).resolve() == Path(path)


def complete_checkpoint(directory: Path) -> str:
    """The tag of the newest complete checkpoint: its run settings are written after every rank saved, so a
    checkpoint cut short by a killed job (which `latest` may already name) is passed over."""
    steps = sorted((int(path.parent.name.split("-", 1)[1]), path.parent.name)
                   for path in directory.glob(f"step-*/{SETTINGS_FILE}") if path.parent.name[5:].isdigit())
    if not steps:
        raise SafeneuronsError(f"--resume: no complete checkpoint in {directory}")
    return steps[-1][1]


def check_resume(directory: Path, settings: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Before anything is loaded: the newest complete checkpoint's run settings must equal this run's (keys in
    `overrides` may differ) and its world size this one's. Returns the checkpoint's settings and its `tag`."""
    tag = complete_checkpoint(directory)
    defaults = run_settings(FineTuneConfig(data=""), None)  # what a checkpoint from before a setting existed used
    saved = {**{key: defaults[key] for key in RUN_KEYS if key not in ("data", "masks")},
             **(read_marker(directory / tag / SETTINGS_FILE) or {})}
    if saved.get("world_size") != settings["world_size"]:
        raise SafeneuronsError(f"--resume: the checkpoint in {directory} was written by {saved.get('world_size')} "
                               f"rank(s) and this run has {settings['world_size']}; resume with "
                               f"{saved.get('world_size')} (resharding a checkpoint is not supported)")
    changed = [key for key in changed_settings(saved, settings, RUN_KEYS, overrides)
               if key != "masks" or not _same_masks(saved, settings)]
    if changed:
        details = "; ".join(f"{key}: {saved.get(key)!r} then, {settings[key]!r} now" for key in changed)
        raise SafeneuronsError(f"--resume would change the run's settings ({details}); resume with the same "
                               f"settings, or allow a change with --resume-override {' '.join(changed)}")
    return {**saved, "tag": tag}
