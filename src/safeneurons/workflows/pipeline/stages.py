"""A study's stages: each runs once per settings fingerprint (resumable) and records its outputs."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from safeneurons.runtime import distributed
from safeneurons.runtime.outputs import write_json
from safeneurons.runtime.resume import matches, read_marker, write_marker
from safeneurons.runtime.timing import Stopwatch
from safeneurons.workflows.pipeline.settings import DONE_FILE, POST_HOC_SOURCE

log = logging.getLogger(__name__)
SAFETY_LAYERS_STAGE = "safety_layers"
DEFENCE_FILE = "defence.json"  # in a defend_* stage folder: the method, its source model, seconds and summary
SECONDS_FILE = "seconds.json"  # in a stage folder: how long its work took (the report's costs)


@dataclass
class Stage:
    """One step of the study: its folder, the settings that decide its outputs, and the work."""

    name: str
    fingerprint: dict
    work: Callable[[Path], None]
    outputs: Callable[[Path], list[Path]] = lambda folder: []  # what must exist for the stage to count as done


def has_masks(folder: Path) -> Path:
    """The mask file (or the index of sharded masks) a score stage writes."""
    from safeneurons.masks.io import INDEX_FILE, MASKS_FILE

    return folder / (INDEX_FILE if (folder / INDEX_FILE).is_file() else MASKS_FILE)


def model_files(folder: Path) -> list[Path]:
    from safeneurons.runtime.checkpoints import INDEX_FILE, WEIGHTS_FILE

    return [folder / "config.json", folder / (INDEX_FILE if (folder / INDEX_FILE).is_file() else WEIGHTS_FILE)]


def stage_done(folder: Path, fingerprint: dict, outputs: Sequence[Path] = ()) -> bool:
    """Finished with these settings and every output still there (a deleted output reruns the stage)."""
    finished = matches(read_marker(folder / DONE_FILE), fingerprint)
    missing = [path for path in outputs if not path.exists()]
    if finished and missing:
        log.warning("stage %s finished earlier but %s is missing: running it again", folder.name, missing[0])
    return finished and not missing


def run_stages(stages: Sequence[Stage], results: Path, force: bool) -> None:
    """Every stage in order, each announced as "stage k of n" with the study's elapsed time."""
    started = time.perf_counter()
    for number, stage in enumerate(stages, 1):
        elapsed = time.perf_counter() - started
        run_stage(stage, results, force, f"stage {number} of {len(stages)} ({stage.name}, {elapsed / 60:.1f} min "
                                         f"into the study)")


def run_stage(stage: Stage, results: Path, force: bool, title: str) -> bool:
    """Run a stage on every rank unless rank 0 finds it finished with the same settings. True if it ran; `title`
    names it in the log."""
    folder = results / stage.name
    finished = not force and distributed.is_main() and stage_done(folder, stage.fingerprint, stage.outputs(folder))
    done = distributed.broadcast_from_main(finished)
    if done:
        log.info("%s: finished earlier with the same settings, skipped (--force redoes it)", title)
        return False
    if distributed.is_main():
        (folder / DONE_FILE).unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    started = Stopwatch()
    log.info("%s: running", title)
    stage.work(folder)
    distributed.barrier()
    seconds = started.seconds()
    if distributed.is_main():
        write_json(folder / SECONDS_FILE, {"seconds": round(seconds, 3),
                                           "cpu_seconds": round(started.cpu_seconds(), 3)})
        write_marker(folder / DONE_FILE, stage.fingerprint)
    log.info("%s: done in %.1f s", title, seconds)
    return True


def stage_seconds(folder: Path) -> float | None:
    """The CPU time a finished stage's work took on rank 0 (None for a stage finished before this was recorded)."""
    record = read_marker(folder / SECONDS_FILE)
    return None if record is None else record.get("cpu_seconds")


@dataclass(frozen=True)
class Run:
    """One fine-tuning of the study: an arm under an attack, its data ordered by a seed."""

    attack: str
    arm: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.attack}_{self.arm}_s{self.seed}"


def source_run(run: Run) -> Run:
    return Run(run.attack, POST_HOC_SOURCE[run.arm], run.seed)
