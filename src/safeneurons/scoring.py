"""`safeneurons score`: find the safety-critical weights (or neurons) of a model with wanda, wandg (SNIP) or random.

Scores (design §2), for every Linear of the decoder layers:
- wanda: ``S = |W| * sqrt(mean over samples of Σ_response-tokens x_j²)``;
- wandg: ``S = |W| * Σ_samples |∂L_sample/∂W|`` with the loss on the response tokens only, fp32 accumulator;
- random: uniform scores, a baseline with the same counts.
Safety-critical = the highest scores: per output row the top ``int(cols × ratio)`` (granularity ``weight``), or
whole output rows ranked by their summed score (``neuron``); with a utility data set, per matrix the top-q
fraction by safety score minus the top-p fraction by utility score (set difference).

How the work is split (N ranks): samples are dealt round-robin, every rank runs the same number of forward (and
backward) passes (padded with a dummy sample that contributes nothing, so ZeRO-3's collectives stay in step).
Per-sample gradients are never materialised as ``param.grad``: forward hooks keep a Linear's input X, tensor hooks
its output gradient dY, and each rank adds ``|dY^T X|`` (the sample's |∂L/∂W|) of its own samples into local fp32
sums. After the passes each sum is reduced once to the rank that owns the Linear's layer (layers round-robin): the
traffic is 4 bytes per scored weight per rank for the whole run, not per pass. The sums of all Linears need
4 bytes per scored weight on every rank; when that exceeds `score_memory` the Linears are taken in rounds that fit
(the passes run once per round). Owners fetch the full weight of one Linear at a time from the ZeRO-3 partitions,
select, and write their masks as one shard each. `batch_size` > 1 runs several samples per pass (the |gradient| is
still taken per sample), which amortises ZeRO-3's parameter gathers over the batch.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from . import distributed
from .data import IGNORE_INDEX, Sample, load_samples, pad_batch
from .errors import SafeneuronsError
from .masks import save_mask_shard, save_masks, shard_name, write_index
from .models import (ScoredLinear, decoder_layers, fused_parts, is_zero3_partitioned, layers_from,
                     load_for_inference, model_device, scored_linears, split_fused)
from .outputs import atomic_file, discard_staging, publish_dir, staging_dir, write_json

log = logging.getLogger(__name__)

METHODS = ("wanda", "wandg", "random")
GRANULARITIES = ("weight", "neuron", "head")
DEFAULT_UTILITY_DATA = "alpaca_cleaned_no_safety"
AUTO_MEMORY_FRACTION = 0.5  # of what a rank can still allocate, for wandg's accumulators by default
FP32_BYTES = 4
DEFAULT_SPARSITY = 0.1  # one default everywhere (score, pipeline, plan): the original extension's
SUMMARY_FILE = "score_summary.json"
SCORES_FILE = "scores.safetensors"
SCORES_INDEX_FILE = SCORES_FILE + ".index.json"


@dataclass
class ScoreConfig:
    method: str
    data: str
    sparsity_ratio: float
    nsamples: int = 128
    seed: int = 0
    max_length: int = 512
    granularity: str = "weight"
    utility_data: str | None = None
    p: float | None = None
    q: float | None = None
    sequential: bool = False
    data_dir: str | None = None
    keep_scores: bool = False  # return the raw safety scores in ScoreResult.scores
    batch_size: int = 1  # samples per forward/backward pass (per-sample statistics either way)
    add_eos: bool = False  # append EOS to each response (the original work does not)
    score_memory: int | None = None  # bytes of wandg's fp32 sums per rank; None = half of what is free

    @property
    def set_difference(self) -> bool:
        return self.p is not None or self.q is not None or self.utility_data is not None

    @property
    def utility_source(self) -> str:
        return self.utility_data or DEFAULT_UTILITY_DATA

    def validate(self) -> None:
        """Raise SafeneuronsError naming the first bad value."""
        if self.method not in METHODS:
            raise SafeneuronsError(f"unknown scoring method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.granularity not in GRANULARITIES:
            raise SafeneuronsError(f"granularity {self.granularity!r} is not one of {', '.join(GRANULARITIES)}")
        if not isinstance(self.sparsity_ratio, (int, float)) or not 0 < self.sparsity_ratio < 1:
            raise SafeneuronsError(f"sparsity ratio {self.sparsity_ratio!r} must lie in (0, 1)")
        if self.nsamples <= 0:
            raise SafeneuronsError(f"nsamples={self.nsamples} must be a positive integer")
        if self.batch_size < 1:
            raise SafeneuronsError(f"batch size {self.batch_size} must be a positive integer")
        if self.score_memory is not None and self.score_memory < 1:
            raise SafeneuronsError(f"score memory {self.score_memory} must be a positive number of bytes")
        if self.max_length < 2:
            raise SafeneuronsError(f"max_length={self.max_length} must be at least 2 tokens")
        if self.set_difference and self.granularity == "head":
            raise SafeneuronsError("granularity head ranks whole heads by --sparsity-ratio; the set difference "
                                   "(--p/--q/--utility-data) works per weight or per neuron")
        if self.set_difference:
            for name, value in (("p", self.p), ("q", self.q)):
                if value is None:
                    raise SafeneuronsError(f"the set difference against {self.utility_source!r} needs both --p and "
                                           f"--q; --{name} is missing")
                if not 0 < value <= 1:
                    raise SafeneuronsError(f"--{name} {value!r} must lie in (0, 1]")


def summary_beside(masks: str | os.PathLike) -> dict[str, Any] | None:
    """The score_summary.json written beside a mask file (or in its folder), when there is one."""
    path = Path(masks)
    summary = (path if path.is_dir() else path.parent) / SUMMARY_FILE
    return json.loads(summary.read_text()) if summary.is_file() else None


def config_from_summary(summary: Mapping[str, Any], data_dir: str | None = None) -> ScoreConfig:
    """The ScoreConfig a score_summary.json records (its settings are ScoreConfig's fields)."""
    names = {item.name for item in fields(ScoreConfig)} - {"keep_scores", "data_dir"}
    return ScoreConfig(**{key: value for key, value in summary.items() if key in names}, data_dir=data_dir)


@dataclass
class ScoreResult:
    masks: dict[str, torch.Tensor]  # the parameters this rank owns (all of them on 1 rank)
    scores: dict[str, torch.Tensor] | None  # float32 safety scores, same keys, when config.keep_scores
    summary: dict[str, Any]  # complete on rank 0


@dataclass(frozen=True)
class Target:
    """A scored Linear, its position in the global order and the rank that owns its layer."""

    index: int
    linear: ScoredLinear
    owner: int

    @property
    def name(self) -> str:
        return self.linear.param_name

    @property
    def weight(self) -> nn.Parameter:
        return self.linear.module.weight

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(getattr(self.weight, "ds_shape", self.weight.shape))

    @property
    def mine(self) -> bool:
        return self.owner == distributed.rank()


def targets_of(model: nn.Module) -> list[Target]:
    return [Target(index, linear, distributed.owner_of(linear.layer))
            for index, linear in enumerate(scored_linears(model))]


# ---------------------------------------------------------------- collective helpers

def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def reduce_to_owner(tensor: torch.Tensor, owner: int) -> torch.Tensor | None:
    """Sum of `tensor` over the ranks, on `owner` only (None elsewhere)."""
    if _distributed():
        dist.reduce(tensor, dst=owner, op=dist.ReduceOp.SUM)
    return tensor if distributed.rank() == owner else None


def broadcast_from_owner(tensor: torch.Tensor, owner: int) -> torch.Tensor:
    if _distributed():
        dist.broadcast(tensor, src=owner)
    return tensor


def mask_on_every_rank(mask: torch.Tensor | None, target: Target, device: torch.device) -> torch.Tensor:
    """The owner's mask of one Linear, sent to every rank (one layer's masks at a time, never the model's)."""
    buffer = mask.to(torch.uint8) if target.mine else torch.zeros(target.shape, dtype=torch.uint8)
    return broadcast_from_owner(buffer.to(device), target.owner).bool()


def weight_on_owner(param: nn.Parameter, owner: int) -> torch.Tensor | None:
    """The full weight on `owner` only: ZeRO-3 partitions are gathered there and nowhere else."""
    is_owner = distributed.rank() == owner
    if not hasattr(param, "ds_id"):
        return param.detach() if is_owner else None
    group = param.ds_process_group
    local = param.ds_tensor.detach().reshape(-1)
    if dist.get_world_size(group=group) == 1:
        return local[:param.ds_numel].view(param.ds_shape) if is_owner else None
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group=group))] if is_owner else None
    dist.gather(local, parts, dst=owner, group=group)
    return torch.cat(parts)[:param.ds_numel].view(param.ds_shape) if is_owner else None


def stored_copies(param: nn.Parameter) -> list[torch.Tensor]:
    """The tensors holding this weight's values on this rank: the whole tensor, or the ZeRO-3 partition (plus the
    full copy that a persistent, never released, parameter keeps)."""
    if not hasattr(param, "ds_id"):
        return [param.data]
    return [param.ds_tensor.data] + ([param.data] if param.data.numel() == param.ds_numel else [])


# ---------------------------------------------------------------- statistics from forward/backward passes

class LinearCapture:
    """Hooks on the target Linears: each pass's inputs X and, when gradients are wanted, output gradients dY."""

    def __init__(self, targets: Sequence[Target], with_grads: bool) -> None:
        self.with_grads = with_grads
        self.inputs: dict[str, torch.Tensor] = {}
        self.output_grads: dict[str, torch.Tensor] = {}
        self.handles = [target.linear.module.register_forward_hook(self._hook(target.name)) for target in targets]

    def _hook(self, name: str):
        def keep(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.inputs[name] = args[0].detach()
            if self.with_grads:
                if not output.requires_grad:  # a lowest scored Linear: its output is where backward stops
                    output.requires_grad_(True)
                output.register_hook(lambda grad: self.output_grads.__setitem__(name, grad.detach()))
        return keep

    def clear(self) -> None:
        self.inputs.clear()
        self.output_grads.clear()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def squared_input_sum(inputs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Σ over the selected token rows (response tokens of real samples) of x_j² (fp32), one value per column."""
    picked = inputs.reshape(-1, inputs.shape[-1])[rows.reshape(-1).to(inputs.device)]
    return picked.float().pow(2).sum(dim=0)


def abs_weight_gradient(inputs: torch.Tensor, output_grad: torch.Tensor) -> torch.Tensor:
    """|∂L/∂W| of one sample from the Linear's input X and output gradient dY: |Σ_tokens dY^T X| (fp32)."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    dy = output_grad.reshape(-1, output_grad.shape[-1]).float()
    return (dy.T @ x).abs_()


@contextlib.contextmanager
def scoring_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients (`LinearCapture` makes the activations that backward needs require
    grad, so it computes no weight gradient and stops at the lowest scored Linears)."""
    flags = [(param, param.requires_grad) for param in model.parameters()]
    was_training = model.training
    for param, _ in flags:
        param.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        model.train(was_training)


@dataclass
class MicroBatch:
    """Right-padded samples; `real` is False for the padding samples that keep the ranks' pass counts equal."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    real: torch.Tensor

    @property
    def response_rows(self) -> torch.Tensor:
        """Token positions whose statistics count: response tokens of real samples."""
        return (self.labels != IGNORE_INDEX) & self.real[:, None]


def rank_batches(samples: Sequence[Sample], batch_size: int, device: torch.device) -> list[MicroBatch]:
    """This rank's samples (round-robin) in micro-batches, padded with dummies so that every rank runs the
    same number of passes (ZeRO-3 gathers weights collectively inside every pass)."""
    per_rank = math.ceil(len(samples) / distributed.world_size())
    mine = distributed.split_evenly(samples)
    flagged = [(sample, True) for sample in mine] + [(samples[0], False)] * (per_rank - len(mine))
    batches = []
    for start in range(0, len(flagged), batch_size):
        chunk = flagged[start:start + batch_size]
        padded = pad_batch([sample for sample, _ in chunk], pad_token_id=0)  # pads are masked and unlabelled
        batches.append(MicroBatch(padded["input_ids"].to(device), padded["labels"].to(device),
                                  padded["attention_mask"].to(device),
                                  torch.tensor([real for _, real in chunk], device=device)))
    return batches


def per_sample_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sample's mean next-token loss over its response tokens (HF's causal-LM loss, one sample at a time)."""
    targets = labels[:, 1:]
    # The flattened [tokens, vocab] form, as HF's loss: its fp32 gradient is about 10x closer to float64 than that
    # of cross_entropy over a transposed [batch, vocab, tokens] tensor.
    token_losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
    return token_losses.sum(dim=1) / (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)


@dataclass
class Entry:
    """The hidden states entering decoder layer `layer`, for one micro-batch: a pass can start there."""

    layer: int
    hidden: torch.Tensor


def _forward(model: nn.Module, batch: MicroBatch, entry: Entry | None, stop: int | None = None,
             **kwargs: Any) -> Any:
    """The model on a micro-batch, from the embeddings or from `entry`, through layer `stop` − 1 (default all)."""
    # Without padding the mask is dropped, so that attention takes its causal fast path (as the original code)
    attention_mask = None if bool(batch.attention_mask.all()) else batch.attention_mask
    inputs = {"input_ids": batch.input_ids} if entry is None else {"inputs_embeds": entry.hidden}
    if entry is None and stop is None:
        return model(**inputs, attention_mask=attention_mask, use_cache=False, **kwargs)
    with layers_from(model, 0 if entry is None else entry.layer, stop):
        return model(**inputs, attention_mask=attention_mask, use_cache=False, **kwargs)


def run_batch(model: nn.Module, batch: MicroBatch, with_grads: bool, entry: Entry | None = None) -> None:
    """One forward pass (from `entry` when given: the layers below it are not run again), and with `with_grads`
    one backward of Σ_real samples (sample's mean loss): the samples of a batch do not interact, so each
    sample's activation gradients are those of its own loss."""
    if not with_grads:
        with torch.no_grad():
            _forward(model, batch, entry)
        return
    with torch.enable_grad():
        logits = _forward(model, batch, entry).logits
        (per_sample_losses(logits, batch.labels) * batch.real).sum().backward()


def next_entries(model: nn.Module, batches: Sequence[MicroBatch], entries: Sequence[Entry] | None,
                 layer: int) -> list[Entry]:
    """The hidden states entering layer `layer` + 1 of every micro-batch: layer `layer` alone, run on its own
    entries (or on the embeddings for layer 0)."""
    found = []
    for index, batch in enumerate(batches):
        kept: dict[str, torch.Tensor] = {}
        handle = decoder_layers(model)[layer].register_forward_hook(
            lambda _m, _a, output: kept.__setitem__("h", (output[0] if isinstance(output, tuple) else output)))
        try:
            with torch.no_grad():
                _forward(model, batch, None if entries is None else entries[index], layer + 1, logits_to_keep=1)
        finally:
            handle.remove()
        found.append(Entry(layer + 1, kept["h"].detach()))
    return found


def collect_statistics(model: nn.Module, targets: Sequence[Target], samples: Sequence[Sample],
                       config: ScoreConfig, entries: Sequence[Entry] | None = None) -> dict[str, torch.Tensor]:
    """Per target, the sum over all samples of Σ x_j² (wanda) or of |∂L_s/∂W| (wandg), on the owner only;
    with `entries` (one per micro-batch) the passes start at their layer.

    Every rank accumulates its own samples locally (fp32) and the sums are reduced to the owners once, as
    data-parallel training reduces gradients: the traffic is one copy of the statistics per rank, whatever the
    number of samples. wandg's accumulators are weight-sized; when all of them do not fit the memory budget
    (`score_memory`), the targets are taken in rounds of consecutive Linears that fit, each round running the
    passes again (its backward stops at the round's lowest Linear)."""
    device = model_device(model)
    batches = rank_batches(samples, config.batch_size, device)
    if config.method != "wandg":
        return _accumulate(model, targets, batches, entries, with_grads=False)
    rounds = accumulation_rounds(targets, score_memory_budget(config, device))
    if distributed.is_main():
        log.info("wandg: %d accumulator round%s of at most %.2f GiB per rank (%.2f GiB for all %d Linears)",
                 len(rounds), "" if len(rounds) == 1 else "s",
                 max(accumulator_bytes(group) for group in rounds) / 2**30, accumulator_bytes(targets) / 2**30,
                 len(targets))
    owned: dict[str, torch.Tensor] = {}
    for group in rounds:
        owned.update(_accumulate(model, group, batches, entries, with_grads=True))
    return owned


def accumulator_bytes(targets: Sequence[Target]) -> int:
    return sum(FP32_BYTES * math.prod(target.shape) for target in targets)


def accumulation_rounds(targets: Sequence[Target], budget: int) -> list[list[Target]]:
    """One round when all the sums fit `budget` bytes; else consecutive targets whose sums fit what the budget leaves
    beside the owned sums that earlier rounds leave on a rank (a Linear larger than that gets a round of its own).
    The same on every rank."""
    if accumulator_bytes(targets) <= budget:
        return [list(targets)]
    owned = max(accumulator_bytes([target for target in targets if target.owner == rank])
                for rank in {target.owner for target in targets})
    rounds: list[list[Target]] = [[]]
    for target in targets:
        if rounds[-1] and accumulator_bytes(rounds[-1] + [target]) > budget - owned:
            rounds.append([])
        rounds[-1].append(target)
    return rounds


def score_memory_budget(config: ScoreConfig, device: torch.device) -> int:
    """Bytes for wandg's local accumulators: `score_memory`, or half of what this rank can still allocate; the
    smallest over the ranks, so that every rank runs the same rounds."""
    budget = config.score_memory
    if budget is None:
        budget = int(AUTO_MEMORY_FRACTION * distributed.available_memory(device))
    return min(distributed.all_gather(budget))


def _accumulate(model: nn.Module, targets: Sequence[Target], batches: Sequence[MicroBatch],
                entries: Sequence[Entry] | None, with_grads: bool) -> dict[str, torch.Tensor]:
    """All of this rank's passes with local fp32 sums for `targets`, then one reduce of each sum to its owner."""
    device = model_device(model)
    capture = LinearCapture(targets, with_grads)
    sums = {target.name: torch.zeros(target.shape if with_grads else target.shape[1], device=device)
            for target in targets}
    try:
        with scoring_mode(model):
            for index, batch in enumerate(distributed.progress(batches, desc="wandg passes" if with_grads
                                                               else "wanda passes", leave=False)):
                capture.clear()
                run_batch(model, batch, with_grads, None if entries is None else entries[index])
                for target in targets:
                    if with_grads:
                        _add_sample_gradients(sums[target.name], capture, target.name, batch)
                    else:
                        sums[target.name] += squared_input_sum(capture.inputs[target.name], batch.response_rows)
    finally:
        capture.close()
    return reduce_to_owners(sums, targets)


def _add_sample_gradients(total: torch.Tensor, capture: LinearCapture, name: str, batch: MicroBatch) -> None:
    """`total` += Σ over the batch's real samples of |∂L_s/∂W| (the gradient is None when the loss does not
    depend on the Linear)."""
    output_grad = capture.output_grads.get(name)
    if output_grad is None:
        return
    for row in batch.real.nonzero().flatten().tolist():
        total += abs_weight_gradient(capture.inputs[name][row], output_grad[row])


def reduce_to_owners(sums: dict[str, torch.Tensor], targets: Sequence[Target]) -> dict[str, torch.Tensor]:
    """Each target's sum over the ranks, on its owner (the others' copies are dropped): the reduces are issued
    together and overlap."""
    if _distributed():
        pending = [dist.reduce(sums[target.name], dst=target.owner, op=dist.ReduceOp.SUM, async_op=True)
                   for target in targets]
        for work in pending:
            work.wait()
    return {target.name: sums[target.name] for target in targets if target.mine}


def random_scores(target: Target, seed: int, stream: int) -> torch.Tensor:
    """Uniform scores that depend only on (seed, parameter index, stream), so every world size draws the same."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + target.index * 2 + stream)
    return torch.rand(target.shape, generator=generator)


def score_targets(model: nn.Module, targets: Sequence[Target], samples: Sequence[Sample] | None,
                  config: ScoreConfig, stream: int = 0, entries: Sequence[Entry] | None = None) -> dict[str, torch.Tensor]:
    """float32 scores of the targets this rank owns; NaN/inf is an error that names the parameter."""
    if config.method == "random":
        return {target.name: random_scores(target, config.seed, stream) for target in targets if target.mine}
    statistics = collect_statistics(model, targets, samples, config, entries)
    scores: dict[str, torch.Tensor] = {}
    problems: list[tuple[int, str]] = []
    for target in targets:
        weight = weight_on_owner(target.weight, target.owner)
        if weight is None:
            continue
        magnitude = weight.float().abs()
        statistic = statistics.pop(target.name)  # freed as we go: scores replace accumulators
        if config.method == "wanda":
            score = magnitude * torch.sqrt(statistic / len(samples)).reshape(1, -1)
        else:
            score = magnitude * statistic
        if not torch.isfinite(magnitude).all():
            problems.append((0, f"parameter {target.name} has NaN or inf weights; its score is not finite"))
        elif not torch.isfinite(score).all():
            problems.append((1, f"the {config.method} score of parameter {target.name} is not finite "
                                f"(NaN or inf in its activations or gradients)"))
        scores[target.name] = score.cpu()
    raise_first_problem(problems)
    return scores


def raise_first_problem(problems: list[tuple[int, str]]) -> None:
    """Collective: raise the most telling problem of any rank (a bad weight before its downstream effects)."""
    reports = [problem for rank_problems in distributed.all_gather(problems) for problem in rank_problems]
    if reports:
        raise SafeneuronsError(min(reports)[1])


# ---------------------------------------------------------------- selection

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
                        granularity: str) -> torch.Tensor:
    """Per matrix: the top-q fraction by safety score minus the top-p fraction by utility score (largest scores);
    the units are single weights (flattened) or, for `neuron`, output rows by their summed score."""
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
                                                     config.granularity)
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


# ---------------------------------------------------------------- the two schedules

def score_all_layers(model: nn.Module, targets: Sequence[Target], sources: Mapping[str, list[Sample] | None],
                     config: ScoreConfig, entries: Mapping[str, Sequence[Entry]] | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every layer from the same passes (one backward per sample), nothing pruned in between; `entries` per
    source start the passes at the lowest scored layer."""
    scores = {source: score_targets(model, targets, samples, config, stream, (entries or {}).get(source))
              for stream, (source, samples) in enumerate(sources.items())}
    return select_masks(targets, scores, config, attention_heads(model), model.config), scores["safety"]


def attention_heads(model: nn.Module) -> tuple[int, int]:
    """(query heads, key/value heads) of the model's attention (they differ under GQA)."""
    heads = int(model.config.num_attention_heads)
    return heads, int(getattr(model.config, "num_key_value_heads", None) or heads)


def score_layer_by_layer(model: nn.Module, targets: Sequence[Target], sources: Mapping[str, list[Sample] | None],
                         config: ScoreConfig) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The original schedule: layer i is scored on the model whose layers < i have their selected weights zeroed.
    The weights are restored afterwards. Each layer's passes start at that layer, from the hidden states that
    enter it (kept per micro-batch, advanced by one layer after each layer is pruned), so the layers below are not
    run again for every layer; under ZeRO-3, whose hooks follow the module order, every pass starts at the
    embeddings."""
    from .freezing import _MaskSource
    from .prune import zero_masked

    saved = [(stored, stored.clone()) for target in targets for stored in stored_copies(target.weight)]
    masks: dict[str, torch.Tensor] = {}
    safety_scores: dict[str, torch.Tensor] = {}
    cached = config.method != "random" and not is_zero3_partitioned(targets[0].linear.module)
    batches = {source: rank_batches(samples, config.batch_size, model_device(model))
               for source, samples in sources.items() if samples is not None} if cached else {}
    entries: dict[str, list[Entry] | None] = {source: None for source in batches}
    try:
        for layer in sorted({target.linear.layer for target in targets}):
            layer_targets = [target for target in targets if target.linear.layer == layer]
            starts = {source: found for source, found in entries.items() if found is not None}
            layer_masks, layer_scores = score_all_layers(model, layer_targets, sources, config, starts)
            for target in layer_targets:
                mask = mask_on_every_rank(layer_masks.get(target.name), target, model_device(model))
                zero_masked(target.name, target.weight, _MaskSource({target.name: mask}))
            masks.update(layer_masks)
            safety_scores.update(layer_scores)
            if layer + 1 < len(decoder_layers(model)):
                entries = {source: next_entries(model, batches[source], entries[source], layer)
                           for source in batches}
    finally:
        for stored, original in saved:
            stored.copy_(original)
    return masks, safety_scores


# ---------------------------------------------------------------- the API

def load_sources(tokenizer: Any, config: ScoreConfig) -> dict[str, list[Sample] | None]:
    """The safety samples (and utility samples for the set difference); random needs none."""
    def samples(source: str) -> list[Sample] | None:
        if config.method == "random":
            return None
        return load_samples(source, tokenizer, config.nsamples, config.seed, config.max_length, config.data_dir,
                            config.add_eos)

    sources = {"safety": samples(config.data)}
    if config.set_difference:
        sources["utility"] = samples(config.utility_source)
    return sources


def score_model(model: nn.Module, tokenizer: Any, config: ScoreConfig) -> ScoreResult:
    """Score and select. Collective under N ranks (every rank calls it); under ZeRO-3 pass the module that
    DeepSpeed's engine hooks (`engine.module`, see `models.load_for_inference`)."""
    config.validate()
    targets = targets_of(model)
    sources = load_sources(tokenizer, config)
    schedule = score_layer_by_layer if config.sequential else score_all_layers
    masks, scores = schedule(model, targets, sources, config)
    summary = build_summary(targets, masks, sources, config)
    return ScoreResult(masks, scores if config.keep_scores else None, summary)


def build_summary(targets: Sequence[Target], masks: Mapping[str, torch.Tensor],
                  sources: Mapping[str, list[Sample] | None], config: ScoreConfig) -> dict[str, Any]:
    """Counts per parameter and per layer, merged on rank 0 (the other ranks get the settings only)."""
    settings = {key: value for key, value in asdict(config).items() if key not in ("keep_scores", "data_dir")}
    if not config.set_difference:
        settings["utility_data"] = None
    summary: dict[str, Any] = {**settings, "world_size": distributed.world_size(),
                               "zero3_partitioned": is_zero3_partitioned(targets[0].linear.module),
                               "nsamples_used": {name: None if samples is None else len(samples)
                                                 for name, samples in sources.items()}}
    local = {target.name: (target.linear.layer, int(masks[target.name].sum()), math.prod(target.shape),
                           list(target.shape), _part_counts(target, masks[target.name], config_of(target)))
             for target in targets if target.mine}
    merged = distributed.merge_dicts_to_main(local)
    if merged is None:
        return summary
    per_parameter = {target.name: dict(zip(("layer", "selected", "total", "shape", "parts"), merged[target.name]))
                     for target in targets}
    for counts in per_parameter.values():
        if counts["parts"] is None:
            del counts["parts"]
    per_layer: dict[str, dict[str, int]] = {}
    for counts in per_parameter.values():
        layer = per_layer.setdefault(str(counts["layer"]), {"selected": 0, "total": 0})
        layer["selected"] += counts["selected"]
        layer["total"] += counts["total"]
    total_selected = sum(counts["selected"] for counts in per_parameter.values())
    total_scored = sum(counts["total"] for counts in per_parameter.values())
    return {**summary, "total_selected": total_selected, "total_scored": total_scored,
            "selected_fraction": total_selected / total_scored, "per_layer": per_layer,
            "per_parameter": per_parameter}


def config_of(target: Target) -> Any:
    return getattr(target.linear, "config", None)


def _part_counts(target: Target, mask: torch.Tensor, config: Any) -> dict[str, dict[str, int]] | None:
    """Selected and total weights of each part of a fused projection (q/k/v, gate/up)."""
    parts = fused_parts(target.linear.name, config) if config is not None else None
    if parts is None:
        return None
    return {part: {"selected": int(mask[rows].sum()), "total": int(mask[rows].numel())} for part, rows in parts.items()}


def _save_float_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    with atomic_file(path) as tmp:
        save_file({name: tensor.detach().float().contiguous().cpu() for name, tensor in tensors.items()}, str(tmp),
                  metadata={"format": "pt"})


def write_score_outputs(result: ScoreResult, out_dir: str | Path, save_scores: bool) -> None:
    """Collective: every rank writes its masks (and scores) as a shard of a staging folder; rank 0 writes the
    index files and the summary and then moves everything into `out_dir`. One rank writes single files."""
    if save_scores and result.scores is None:
        raise SafeneuronsError("--save-scores needs the scores: score with ScoreConfig(keep_scores=True)")
    final = Path(out_dir)
    if distributed.is_main():
        discard_staging(final)
    distributed.barrier()
    staging = staging_dir(final)
    world, rank = distributed.world_size(), distributed.rank()
    try:
        if world == 1:
            save_masks(result.masks, staging)
            if save_scores:
                _save_float_tensors(result.scores, staging / SCORES_FILE)
        else:
            save_mask_shard(result.masks, staging, rank, world)
            if save_scores:
                _save_float_tensors(result.scores, staging / shard_name(rank, world, "scores"))
        problem = None
    except OSError as error:
        problem = f"cannot write the masks to {staging}: {error}"
    try:
        distributed.all_ranks_ok(problem is None, problem or "")
        owned = distributed.gather_to_main(sorted(result.masks))
        if distributed.is_main():
            _finish_outputs(staging, owned, result.summary, save_scores)
            remove_stale_outputs(final)
            publish_dir(final)
    except BaseException:
        if distributed.is_main():
            discard_staging(final)
        raise
    finally:
        distributed.barrier()


def remove_stale_outputs(final: Path) -> None:
    """A previous run's mask and score files (say, shards of another world size) would mix with the new ones."""
    for pattern in ("masks*.safetensors*", "scores*.safetensors*", SUMMARY_FILE):
        for stale in final.glob(pattern):
            stale.unlink()


def _finish_outputs(staging: Path, owned: list[list[str]], summary: Mapping[str, Any], save_scores: bool) -> None:
    world = len(owned)
    if world > 1:
        metadata = {"total_size": summary.get("total_scored", 0)}
        write_index(staging, {name: shard_name(rank, world) for rank, names in enumerate(owned) for name in names},
                    metadata)
        if save_scores:
            write_index(staging, {name: shard_name(rank, world, "scores") for rank, names in enumerate(owned)
                                  for name in names}, metadata, index_file=SCORES_INDEX_FILE)
    write_json(staging / SUMMARY_FILE, summary)


# ---------------------------------------------------------------- loading (ZeRO-3) and the CLI

def configure_parser(parser: argparse.ArgumentParser) -> None:
    from .cli import add_eos_argument, add_model_arguments, add_run_arguments

    add_model_arguments(parser, "--model")
    add_run_arguments(parser)
    parser.add_argument("--method", required=True, metavar="{" + ",".join(METHODS) + "}",
                        help="wanda (|W|·activation norm), wandg (|W|·Σ per-sample |gradient|, SNIP) or random")
    parser.add_argument("--data", required=True,
                        help="safety data: a name (align, align_short, demo-align, …) or a file")
    parser.add_argument("--sparsity-ratio", type=float, default=DEFAULT_SPARSITY,
                        help="fraction selected per output row (weight), of the rows (neuron) or of the heads (head), "
                             "in (0, 1); the set difference selects by --p/--q instead (default %(default)s, the "
                             "original extension's)")
    parser.add_argument("--granularity", default="weight",
                        help="weight (top per row), neuron (whole rows) or head (whole attention heads) "
                             "(default %(default)s)")
    parser.add_argument("--utility-data", default=None,
                        help=f"utility data of the set difference (default {DEFAULT_UTILITY_DATA} with --p/--q)")
    parser.add_argument("--p", type=float, default=None,
                        help="set difference: minus the top-p fraction by utility score, p in (0, 1]")
    parser.add_argument("--q", type=float, default=None,
                        help="set difference: the top-q fraction by safety score, q in (0, 1]")
    parser.add_argument("--nsamples", type=int, default=128, help="samples drawn with --seed (default %(default)s)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per sample (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="samples per pass; statistics stay per sample (default %(default)s)")
    parser.add_argument("--score-memory", default="auto", metavar="SIZE",
                        help="wandg: memory per rank for the local fp32 sums of |gradient| (e.g. 8GiB, 512MiB); "
                             "all Linears at once when they fit, else in rounds that fit, each running the passes "
                             "again (default auto: half of what the rank can still allocate)")
    parser.add_argument("--sequential", action="store_true",
                        help="the original layer-by-layer schedule: later layers scored with earlier selections zeroed")
    parser.add_argument("--save-scores", action="store_true", help="also write the raw scores (float32)")
    add_eos_argument(parser)


def config_from_args(args: argparse.Namespace) -> ScoreConfig:
    return ScoreConfig(method=args.method, data=args.data, sparsity_ratio=args.sparsity_ratio,
                       nsamples=args.nsamples, seed=args.seed, max_length=args.max_length,
                       granularity=args.granularity, utility_data=args.utility_data, p=args.p, q=args.q,
                       sequential=args.sequential, data_dir=args.data_dir, keep_scores=args.save_scores,
                       batch_size=args.batch_size, add_eos=args.add_eos,
                       score_memory=parse_memory_size(args.score_memory, "--score-memory"))


MEMORY_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory_size(text: str, option: str) -> int | None:
    """Bytes of a size such as 8GiB, 512MiB, 1.5GB or 1000000; None for auto."""
    if text.strip().lower() == "auto":
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match and MEMORY_UNITS.get(match.group(2).lower())
    if not unit or float(match.group(1)) * unit < 1:
        raise SafeneuronsError(f"{option} {text!r} is not a memory size; expected auto or a positive size such as "
                               f"8GiB, 512MiB or 2GB")
    return int(float(match.group(1)) * unit)


def run(args: argparse.Namespace) -> int:
    from .data import check_sources
    from .outputs import check_output_dir

    config = config_from_args(args)
    config.validate()  # before any process group or model, so bad input costs nothing and writes nothing
    check_output_dir(args.out)
    if config.method != "random":
        check_sources(config.data, config.utility_source if config.set_difference else None,
                      directory=config.data_dir)
    context = distributed.init_distributed(require_process_group=args.deepspeed is not None)
    loaded = load_for_inference(args.model, args.dtype, args.deepspeed, args.cache_dir, context.device)
    result = score_model(loaded.model, loaded.tokenizer, config)
    result.summary.update(model=args.model, dtype=args.dtype, deepspeed=args.deepspeed)
    write_score_outputs(result, args.out, args.save_scores)
    if distributed.is_main():
        summary = result.summary
        print(f"{config.method}: selected {summary['total_selected']} of {summary['total_scored']} weights "
              f"({summary['selected_fraction']:.4%}) -> {args.out}")
    return 0


class SafetyNeuronAnalyzer:
    """The original extension's API: find the safety-critical weights of a loaded model."""

    def __init__(self, model: nn.Module, tokenizer: Any, data_dir: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.data_dir = data_dir
        self.safety_masks: dict[str, torch.Tensor] | None = None
        self.summary: dict[str, Any] | None = None
        self.last_settings: dict[str, Any] | None = None  # for re-scoring a fine-tuned model the same way
        self.original_weights: dict[str, torch.Tensor] | None = None

    def identify_safety_critical_neurons(self, prune_method: str = "wandg", prune_data: str = "align",
                                         sparsity_ratio: float = 0.1, nsamples: int = 128,
                                         seed: int = 0) -> dict[str, torch.Tensor]:
        """All masks (bool, 1 = safety-critical), named like the parameters, on every rank."""
        self.last_settings = dict(prune_method=prune_method, prune_data=prune_data, sparsity_ratio=sparsity_ratio,
                                  nsamples=nsamples, seed=seed)
        config = ScoreConfig(method=prune_method, data=prune_data, sparsity_ratio=sparsity_ratio,
                             nsamples=nsamples, seed=seed, data_dir=self.data_dir)
        result = score_model(self.model, self.tokenizer, config)
        masks: dict[str, torch.Tensor] = {}
        for part in distributed.all_gather(result.masks):  # convenience API: the whole mask set on each rank
            masks.update(part)
        self.safety_masks, self.summary = masks, result.summary
        return masks

    def freeze_safety_critical_neurons(self, model: nn.Module | None = None) -> nn.Module:
        """`model` (default: the analysed one) with its safety-critical weights frozen: the `FrozenWeights` is
        attached as `model.safeneurons_frozen`, which `FineTuner(model, tokenizer)` picks up, so the masked
        elements stay bit-identical through its fine-tuning."""
        if self.safety_masks is None:
            raise SafeneuronsError("call identify_safety_critical_neurons before freezing")
        from .freezing import FROZEN_ATTRIBUTE, freeze

        model = self.model if model is None else model
        setattr(model, FROZEN_ATTRIBUTE, freeze(model, self.safety_masks))
        return model

    def _store_original_weights(self, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Copies of the scored weights of `model` (default: the analysed one), for `_extract_safety_masks`
        (single process: under ZeRO-3 a rank holds partitions only)."""
        model = self.model if model is None else model
        self.original_weights = {linear.param_name: linear.module.weight.detach().clone()
                                 for linear in scored_linears(model)}
        return self.original_weights

    def _extract_safety_masks(self, pruned_model: nn.Module) -> dict[str, torch.Tensor]:
        """The original extension's masks of a pruned copy: the weights that are zero in `pruned_model` but were
        not in the stored originals."""
        if self.original_weights is None:
            raise SafeneuronsError("call _store_original_weights before _extract_safety_masks")
        current = {linear.param_name: linear.module.weight.detach() for linear in scored_linears(pruned_model)}
        if current.keys() != self.original_weights.keys():
            raise SafeneuronsError("the pruned model's scored weights are not those of the stored model")
        return {name: (current[name] == 0) & (original != 0) for name, original in self.original_weights.items()}
