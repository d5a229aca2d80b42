"""Dynamic freezing: the frozen set follows the safety-critical weights as fine-tuning moves them.

Every K optimizer steps the model being trained is scored again with the method, data and selection of the mask's
own `score_summary.json`, and the frozen set becomes the union of the old set and the new selection
(`union`) or the new selection alone (`replace`). Elements released keep their trained value and train on;
newly frozen ones freeze at their current value; elements frozen before and after keep the value they were
frozen at. The set travels in the fine-tuning checkpoints (each rank its own slices), so a resumed run
continues with the set it had.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from safeneurons.errors import SafeneuronsError
from safeneurons.interventions.freezing import FrozenWeights, slice_from_local_mask
from safeneurons.masks.bits import unpack_bits
from safeneurons.runtime import distributed
from safeneurons.runtime.distributed import reduce_over_ranks
from safeneurons.runtime.zero3 import local_layout

log = logging.getLogger(__name__)

STATE_FILE = "frozen_set_rank{rank}.pt"


@dataclass
class Rescoring:
    """One update of the frozen set, counted over the whole model."""

    step: int
    selected: int  # the new selection's size
    kept: int  # frozen before and after
    added: int  # newly frozen
    released: int  # frozen before, free after
    frozen: int  # the set's size after the update


def rescore_config(masks: Any, data_dir: str | None):
    """The ScoreConfig of the mask's score_summary.json, checked before any model loads."""
    from safeneurons.scores.config import config_from_summary, summary_beside

    summary = None if isinstance(masks, Mapping) else summary_beside(masks)
    if summary is None:
        raise SafeneuronsError(f"--rescore-every needs the score_summary.json that `safeneurons score` writes beside "
                               f"the masks; none beside {masks}")
    config = config_from_summary(summary, data_dir)
    if config.sequential:
        raise SafeneuronsError("--rescore-every cannot re-score with --sequential (it prunes each scored layer)")
    config.validate()
    return config


class DynamicFreezing:
    """Holds the current `FrozenWeights` and replaces it every `every` steps (collective)."""

    def __init__(self, frozen: FrozenWeights, model: nn.Module, tokenizer: Any, score_config: Any, every: int,
                 mode: str, device: torch.device) -> None:
        self.frozen, self.model, self.tokenizer = frozen, model, tokenizer
        self.score_config, self.every, self.mode, self.device = score_config, every, mode, device
        self.history: list[Rescoring] = []
        self._optimizer: Any = None

    def attach(self, target: Any) -> None:
        self._optimizer = target
        self.frozen.attach(target)

    def after_step(self, step: int, total: int) -> None:
        if step % self.every == 0 and step < total:
            self.rescore(step)

    def rescore(self, step: int) -> None:
        """Score the model as it is now and update the frozen set (collective)."""
        from safeneurons.scores.config import mask_on_every_rank, targets_of
        from safeneurons.scores.schedules import score_model

        was_training = self.model.training
        result = score_model(self.model, self.tokenizer, self.score_config)
        self.model.train(was_training)
        parameters = dict(self.model.named_parameters())
        slices = dict(self.frozen.slices)  # masks beyond the scored Linears (if any) stay as they are
        counts = torch.zeros(5, dtype=torch.float64)  # selected, kept, added, released, frozen
        for target in targets_of(self.model):
            selected = mask_on_every_rank(result.masks.get(target.name), target, self.device).reshape(-1).cpu()
            param = parameters[target.name]
            start, length, valid = local_layout(param)
            new = torch.zeros(length, dtype=torch.bool)
            new[:valid] = selected[start:start + valid]
            old = self.frozen.local_mask(target.name)
            old = torch.zeros(length, dtype=torch.bool) if old is None else old.cpu()
            current = new | old if self.mode == "union" else new
            counts += torch.tensor([new.sum(), (old & current).sum(), (current & ~old).sum(), (old & ~current).sum(),
                                    current.sum()], dtype=torch.float64)
            slices[target.name] = slice_from_local_mask(target.name, param, current)
        self._replace(FrozenWeights(slices, self.frozen.strength))
        totals = [int(reduce_over_ranks(float(value))) if self.frozen.partitioned else int(value) for value in counts]
        self.history.append(Rescoring(step, *totals))
        log.info("re-scored at step %d: %d selected, %d frozen (%d kept, %d added, %d released)", step, totals[0],
                 totals[4], totals[1], totals[2], totals[3])

    def _replace(self, frozen: FrozenWeights) -> None:
        self.frozen.detach()
        self.frozen = frozen
        if self._optimizer is not None:
            frozen.attach(self._optimizer)

    # --- checkpoints: each rank its own slices -------------------------------------------------------------
    def save(self, folder: Path) -> None:
        state = {"masks": {name: (entry.packed.cpu(), entry.length) for name, entry in self.frozen.slices.items()},
                 "history": [asdict(record) for record in self.history]}
        torch.save(state, folder / STATE_FILE.format(rank=distributed.rank()))

    def load(self, folder: Path) -> None:
        """After the checkpoint's weights are loaded: the frozen set it had, frozen at the loaded values (which
        are the values its elements were frozen at)."""
        path = folder / STATE_FILE.format(rank=distributed.rank())
        if not path.is_file():
            raise SafeneuronsError(f"--resume: {path} is missing: the checkpoint was not written with --rescore-every")
        state = torch.load(path, map_location="cpu", weights_only=True)
        parameters = dict(self.model.named_parameters())
        slices = {name: slice_from_local_mask(name, parameters[name], unpack_bits(packed, length))
                  for name, (packed, length) in state["masks"].items()}
        self._replace(FrozenWeights(slices, self.frozen.strength))
        self.history = [Rescoring(**record) for record in state["history"]]
