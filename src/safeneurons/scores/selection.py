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
    model's (query heads, key/value heads) for granularity head. An experts' matrix is selected as the Linears
    it stacks: rows are each expert's output rows (weight: the top of every row; neuron: rows across all experts
    of the matrix); granularity expert ranks whole experts per layer."""
    if config.granularity == "head":
        return _select_head_masks(targets, scores["safety"], heads, config.sparsity_ratio, model_config)
    if config.granularity == "expert":
        return _select_expert_masks(targets, scores["safety"], config.sparsity_ratio)
    masks = {}
    for target in targets:
        if not target.mine:
            continue
        safety = as_rows(target, scores["safety"][target.name])
        if config.set_difference:
            mask = set_difference_mask(safety, as_rows(target, scores["utility"][target.name]), config.p, config.q,
                                       config.granularity, config.setdiff_scope)
        else:
            mask = select_weights(safety, config.sparsity_ratio, config.granularity)
        masks[target.name] = from_rows(target, mask)
    return masks


def as_rows(target: Target, tensor: torch.Tensor) -> torch.Tensor:
    """A Linear's tensor as it is; an experts' matrix's as its experts' canonical rows stacked, [E × out, in]."""
    bank = target.linear.experts
    if bank is None:
        return tensor
    canonical = bank.canonical(tensor)
    return canonical.reshape(-1, canonical.shape[-1])


def from_rows(target: Target, rows: torch.Tensor) -> torch.Tensor:
    """The inverse of `as_rows`: back to the parameter's shape and layout."""
    bank = target.linear.experts
    if bank is None:
        return rows
    canonical = rows.reshape(bank.num_experts, -1, rows.shape[-1])
    return bank.canonical(canonical).contiguous()


def expert_scores(target: Target, scores: torch.Tensor) -> torch.Tensor:
    """[E]: each expert's summed score in an experts' matrix."""
    return scores.reshape(target.linear.experts.num_experts, -1).sum(dim=1)


def _select_expert_masks(targets: Sequence[Target], safety: Mapping[str, torch.Tensor],
                         ratio: float) -> dict[str, torch.Tensor]:
    """Granularity expert: per MoE layer, the top int(E × ratio) experts by their summed score over both experts'
    matrices, each chosen expert's slices wholly selected; every other matrix (attention, router, shared experts,
    dense layers) selects nothing."""
    masks = {target.name: torch.zeros(target.shape, dtype=torch.bool) for target in targets if target.mine}
    for layer in sorted({target.linear.layer for target in targets if target.mine}):
        experts = [target for target in targets if target.linear.layer == layer and target.linear.experts is not None]
        if not experts:
            continue
        summed = sum(expert_scores(target, safety[target.name]) for target in experts)
        chosen = summed.sort(descending=True, stable=True).indices[:int(summed.numel() * ratio)]
        for target in experts:
            masks[target.name][chosen] = True
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
