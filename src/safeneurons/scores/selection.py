"""From scores to masks: top weights per row, top neurons, top heads, and the set difference."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from safeneurons.models.structure import split_fused

if TYPE_CHECKING:
    from safeneurons.scores.config import ScoreConfig, Target


def select_weights(scores: torch.Tensor, ratio: float, granularity: str) -> torch.Tensor:
    """The highest scores: per output row the top int(cols × ratio), or the top int(rows × ratio) whole rows."""
    rows, cols = scores.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    if granularity == "weight":
        count = int(cols * ratio)
        if count:  # a stable sort: ties go to the lower column, as in the original code
            mask.scatter_(1, scores.sort(dim=1, descending=True, stable=True).indices[:, :count], True)
    else:
        count = int(rows * ratio)
        if count:
            mask[scores.sum(dim=1).topk(count).indices] = True
    return mask


def _top_units(unit_scores: torch.Tensor, fraction: float) -> torch.Tensor:
    flags = torch.zeros(unit_scores.numel(), dtype=torch.bool)
    count = int(fraction * unit_scores.numel())
    if count:
        flags[unit_scores.reshape(-1).topk(count).indices] = True
    return flags


def set_difference_mask(safety: torch.Tensor, utility: torch.Tensor, p: float, q: float,
                        granularity: str, scope: str = "matrix") -> torch.Tensor:
    """The top-q fraction by safety score minus the top-p fraction by utility score (largest scores). The units
    are single weights or, for `neuron`, output rows by their summed score. `scope` `matrix` (the original code)
    ranks the weights of the whole flattened matrix; `row` (the paper's description) ranks each output row's
    weights on their own, the top int(cols × q) and int(cols × p) of every row."""
    if granularity == "weight" and scope == "row":
        return select_weights(safety, q, "weight") & ~select_weights(utility, p, "weight")
    if granularity == "weight":
        return (_top_units(safety, q) & ~_top_units(utility, p)).view(safety.shape)
    rows = _top_units(safety.sum(dim=1), q) & ~_top_units(utility.sum(dim=1), p)
    return rows[:, None].expand(safety.shape).clone()


def head_scores(scores: Mapping[str, torch.Tensor], heads: int, kv_heads: int) -> torch.Tensor:
    """Summed score of each query head: its q_proj rows and o_proj columns, plus its share (1 / queries per kv
    head) of the k_proj and v_proj rows of the key/value head it reads."""
    q, k, v, o = (scores[f"self_attn.{name}_proj"] for name in "qkvo")
    group = heads // kv_heads
    per_head = q.reshape(heads, -1).sum(1) + o.reshape(o.shape[0], heads, -1).sum((0, 2))
    shared = k.reshape(kv_heads, -1).sum(1) + v.reshape(kv_heads, -1).sum(1)
    return per_head + shared.repeat_interleave(group) / group


def select_heads(scores: Mapping[str, torch.Tensor], heads: int, kv_heads: int, ratio: float) -> dict[str, torch.Tensor]:
    """Masks of one layer's Linears (keyed by their short names) selecting the top int(heads × ratio) heads: a
    head's q_proj rows and o_proj columns, and the k/v rows of a key/value head once every query head reading it
    is selected; the MLP's masks are empty."""
    ranked = head_scores(scores, heads, kv_heads).sort(descending=True, stable=True).indices
    chosen = torch.zeros(heads, dtype=torch.bool)
    chosen[ranked[:int(heads * ratio)]] = True
    kv_chosen = chosen.view(kv_heads, heads // kv_heads).all(dim=1)
    masks = {name: torch.zeros(score.shape, dtype=torch.bool) for name, score in scores.items()}
    q_rows, kv_rows = masks["self_attn.q_proj"].shape[0] // heads, masks["self_attn.k_proj"].shape[0] // kv_heads
    masks["self_attn.q_proj"][chosen.repeat_interleave(q_rows)] = True
    masks["self_attn.o_proj"][:, chosen.repeat_interleave(q_rows)] = True
    for name in ("self_attn.k_proj", "self_attn.v_proj"):
        masks[name][kv_chosen.repeat_interleave(kv_rows)] = True
    return masks


def select_masks(targets: Sequence[Target], scores: Mapping[str, Mapping[str, torch.Tensor]],
                 config: ScoreConfig, heads: tuple[int, int] = (1, 1), model_config: Any = None
                 ) -> dict[str, torch.Tensor]:
    """Masks of the targets this rank owns, from `scores["safety"]` (and `scores["utility"]`); `heads` = the
    model's (query heads, key/value heads) for granularity head."""
    if config.granularity == "head":
        return _select_head_masks(targets, scores["safety"], heads, config.sparsity_ratio, model_config)
    masks = {}
    for target in targets:
        if not target.mine:
            continue
        safety = scores["safety"][target.name]
        if config.set_difference:
            masks[target.name] = set_difference_mask(safety, scores["utility"][target.name], config.p, config.q,
                                                     config.granularity, config.setdiff_scope)
        else:
            masks[target.name] = select_weights(safety, config.sparsity_ratio, config.granularity)
    return masks


def _select_head_masks(targets: Sequence[Target], safety: Mapping[str, torch.Tensor], heads: tuple[int, int],
                       ratio: float, config: Any = None) -> dict[str, torch.Tensor]:
    """Head masks of the layers this rank owns (an owner holds all of a layer's scores); fused projections are
    ranked and marked through views of their q/k/v parts."""
    masks = {}
    for layer in sorted({target.linear.layer for target in targets if target.mine}):
        mine = [target for target in targets if target.linear.layer == layer]
        chosen = select_heads(split_fused({t.linear.name: safety[t.name] for t in mine}, config), *heads, ratio)
        fused = {t.linear.name: torch.zeros(safety[t.name].shape, dtype=torch.bool) for t in mine}
        for name, view in split_fused(fused, config).items():
            view.copy_(chosen[name])
        masks.update({t.name: fused[t.linear.name] for t in mine})
    return masks
