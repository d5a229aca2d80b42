"""Zero the masked elements of a model's weights in place (every local copy under ZeRO-3); random masks of a
reference's counts (the controls)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from torch import nn

from safeneurons.runtime.zero3 import full_numel, full_shape, is_persistent, local_layout, local_weights

if TYPE_CHECKING:
    from safeneurons.masks.source import MaskElements


def zero_masked(name: str, param: nn.Parameter, source: MaskElements, lowest: bool = False) -> int:
    """Zero the masked elements of the part of `param` this rank holds (and of the whole copy that a persistent
    ZeRO-3 parameter keeps, from its whole mask: such parameters are small); returns the count zeroed here."""
    shape = full_shape(param)
    start, _, valid = local_layout(param)
    mask = source.elements(name, shape, start, start + valid) ^ lowest
    weights = local_weights(param)
    weights[:valid][mask.to(weights.device)] = 0
    if is_persistent(param):
        whole = source.elements(name, shape, 0, full_numel(param)).view(shape) ^ lowest
        param.data[whole.to(param.device)] = 0
    return int(mask.sum())


def random_like_counts(reference: Mapping[str, torch.Tensor], seed: int,
                       names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Uniformly random masks with exactly the reference's count in every matrix. Each matrix draws from its own
    seed, numbered by its place among `names` sorted (default the reference's own: a layer-sharded rank that
    holds some of a model's matrices passes all their names and draws what a whole-model rank would)."""
    number = {name: index for index, name in enumerate(sorted(reference if names is None else names))}
    masks = {}
    for name, mask in sorted(reference.items()):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + number[name])
        chosen = torch.zeros(mask.numel(), dtype=torch.bool)
        chosen[torch.randperm(mask.numel(), generator=generator)[:int(mask.sum())]] = True
        masks[name] = chosen.view(mask.shape)
    return masks
