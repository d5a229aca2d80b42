"""`safeneurons lowrank`: remove the ranks of each Linear's output that the safety data uses and the utility data
does not — ActSVD (Wei et al. 2024 §4).

For a Linear with weight W (d_out × d_in) and inputs X (the response tokens of a data set, one row per token),
A = X Wᵀ; the top-r right singular vectors V of A span the output directions that data uses, Π = V Vᵀ. Then

- with utility data: W' = W − (I − Π_u) Π_s W (r_u utility ranks kept, r_s safety ranks removed);
- without (the plain variant): W' = W − Π_s W (the top r_s safety ranks removed).

V comes from AᵀA = W (XᵀX) Wᵀ, so only the d_in × d_in Gram XᵀX of each input is accumulated (float64; q/k/v
and gate/up share theirs); exact by default (eigh), or randomized (`--niter`, torch.svd_lowrank on a square root
of the Gram). `--sequential` treats one layer at a time on the model whose earlier layers are already modified,
as the original code; the default takes every layer's statistics from the same passes.

Distributed: samples are split across the ranks and each Gram reduced (once) to the rank that owns the Linears
reading that input (such groups round-robin); the owners gather their weights (ZeRO-3 partitions), compute W'
side by side and send each to every rank, which writes its own part back.

Mixtures of experts (models.moe): each routed expert is a Linear of its own, its Grams taken over the response
tokens routed to it (for `down_proj`, over its own act(gate)·up), and its safety-only ranks removed from its slice
of the fused parameter. Routers and the shared experts' gates keep their weights: they decide how much of each
expert a token gets, and removing ranks from an [experts × hidden] decision is not what ActSVD measures.

Layer-sharded (`--shard layers`, models.blocks): every stage runs its replica's samples through its own block of
layers (the hidden states passed stage to stage) and accumulates its own Linears' Grams, in the order one rank
would (with one replica, the same float64 sums bit for bit); the stage's replicas sum theirs onto replica 0's
rank, which computes the block's new weights and sends them to the stage's other replicas. No weight leaves its
stage: the model is written block by block. `--sequential` runs one pipeline sweep per layer.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import nn

from safeneurons.data.readers import check_sources
from safeneurons.data.samples import load_samples
from safeneurons.errors import SafeneuronsError
from safeneurons.models.blocks import block_of, load_source, save_blocks
from safeneurons.models.hooks import Hooks
from safeneurons.models.loading import ModelSource, model_skeleton, save_hf_folder
from safeneurons.models.structure import model_device, scored_linears
from safeneurons.runtime import distributed
from safeneurons.runtime.distributed import broadcast_from_owner, reduce_to_owner
from safeneurons.runtime.pipeline import broadcast_over_replicas, sum_over_replicas
from safeneurons.runtime.outputs import check_output_dir
from safeneurons.runtime.zero3 import is_persistent, local_layout, local_weights, weight_on_owner
from safeneurons.scores.config import targets_of
from safeneurons.scores.passes import rank_batches, run_batch, scoring_mode
from safeneurons.scores.sharded import forward_sweep, replica_batches

if TYPE_CHECKING:
    from safeneurons.data.examples import Sample
    from safeneurons.models.blocks import LayerBlock
    from safeneurons.scores.config import Target

log = logging.getLogger(__name__)
SUMMARY_FILE = "lowrank_summary.json"


@dataclass
class LowRankConfig:
    data: str  # safety data
    rank_safety: int | None = None  # r_s; or rank_neg = min(d_out, d_in) − r_s
    rank_utility: int | None = None  # r_u; or rank_pos; none of both: the plain variant
    utility_data: str | None = None
    rank_pos: int | None = None
    rank_neg: int | None = None
    niter: int | None = None  # randomized SVD iterations; None: exact
    sequential: bool = False
    nsamples: int = 128
    seed: int = 0
    max_length: int = 512
    batch_size: int = 1
    data_dir: str | None = None
    add_eos: bool = False

    @property
    def with_utility(self) -> bool:
        return self.utility_data is not None

    def ranks(self, d_out: int, d_in: int) -> tuple[int, int | None]:
        """(r_s, r_u) of a Linear, from the direct counts or the original's counts from the other end."""
        total = min(d_out, d_in)
        r_s = self.rank_safety if self.rank_safety is not None else total - self.rank_neg
        r_u = None
        if self.with_utility:
            r_u = self.rank_utility if self.rank_utility is not None else total - self.rank_pos
        return r_s, r_u

    def validate(self, shapes: Sequence[tuple[int, int]] = ()) -> None:
        """One-line errors before any compute; `shapes` are the scored Linears' (d_out, d_in), whose ranks are
        checked when given (from the model's skeleton)."""
        if (self.rank_safety is None) == (self.rank_neg is None):
            raise SafeneuronsError("give exactly one of --rank-safety and --rank-neg")
        if self.with_utility and (self.rank_utility is None) == (self.rank_pos is None):
            raise SafeneuronsError("with --utility-data give exactly one of --rank-utility and --rank-pos")
        if not self.with_utility and (self.rank_utility is not None or self.rank_pos is not None):
            raise SafeneuronsError("--rank-utility/--rank-pos need --utility-data (the projection it spans)")
        if self.niter is not None and self.niter < 0:
            raise SafeneuronsError(f"--niter {self.niter} must be >= 0")
        for name in ("nsamples", "batch_size"):
            if getattr(self, name) < 1:
                raise SafeneuronsError(f"--{name.replace('_', '-')} {getattr(self, name)} must be a positive integer")
        for d_out, d_in in sorted(set(shapes)):
            r_s, r_u = self.ranks(d_out, d_in)
            for label, rank in (("safety", r_s), ("utility", r_u)):
                if rank is not None and not 0 <= rank < min(d_out, d_in):
                    raise SafeneuronsError(f"{label} rank {rank} of a {d_out} x {d_in} Linear must lie in "
                                           f"[0, {min(d_out, d_in) - 1}] (min(d_out, d_in) = {min(d_out, d_in)})")


def top_output_directions(weight: torch.Tensor, gram: torch.Tensor, rank: int, niter: int | None) -> torch.Tensor:
    """[d_out, rank] orthonormal: the top right singular vectors of A = X Wᵀ, from the Gram XᵀX (float64).

    Exact: eigenvectors of AᵀA = W (XᵀX) Wᵀ, or, for a wide output (d_out > d_in), of the d_in × d_in matrix
    C Cᵀ with C = Rᵀ Wᵀ and XᵀX = R Rᵀ (same nonzero spectrum; V = Cᵀ U / σ), which is much cheaper."""
    w = weight.double()
    if rank == 0:
        return w.new_zeros(w.shape[0], 0)
    if niter is None and w.shape[0] <= w.shape[1]:
        _, vectors = torch.linalg.eigh(w @ gram @ w.T)  # AᵀA; eigenvalues ascending
        return vectors[:, -rank:]
    values, basis = torch.linalg.eigh(gram)
    root = basis * values.clamp(min=0).sqrt()  # gram = root rootᵀ, so CᵀC = AᵀA for C = rootᵀ Wᵀ
    c = root.T @ w.T
    if niter is not None:
        return torch.svd_lowrank(c, q=rank, niter=niter)[2]
    squares, left = torch.linalg.eigh(c @ c.T)
    top, left = squares[-rank:].clamp(min=torch.finfo(torch.float64).tiny), left[:, -rank:]
    return (c.T @ left) / top.sqrt()


def modified_weight(weight: torch.Tensor, safety_gram: torch.Tensor, utility_gram: torch.Tensor | None,
                    r_s: int, r_u: int | None, niter: int | None) -> torch.Tensor:
    """W − (I − Π_u) Π_s W, or W − Π_s W without utility data; in the weight's dtype."""
    w = weight.double()
    safety = top_output_directions(weight, safety_gram, r_s, niter)
    removed = safety @ (safety.T @ w)  # Π_s W, without forming the d_out × d_out projection
    if utility_gram is not None:
        utility = top_output_directions(weight, utility_gram, r_u, niter)
        removed = removed - utility @ (utility.T @ removed)
    return (w - removed).to(weight.dtype)


# ---------------------------------------------------------------- statistics

class GramRecorder(Hooks):
    """Forward hooks that add XᵀX of each target's input (response tokens only) to float64 Grams; Linears that
    read the same tensor (q/k/v, gate/up) share one Gram. An experts' matrix has one Gram per expert, [E, in, in],
    over the tokens routed to each expert (the experts run `ExpertBank.routed_forward`)."""

    def __init__(self, targets: Sequence[Target]) -> None:
        super().__init__()
        self.rows: torch.Tensor | None = None
        self.grams: dict[str, torch.Tensor] = {}
        self.shared: dict[str, str] = {}  # target -> the target whose Gram it shares
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}  # the current layer's inputs (held: ids stay unique)
        self._layer: int | None = None
        banks: dict[int, tuple[Any, dict[str, Target]]] = {}
        for target in targets:
            if target.linear.experts is None:
                self.on_output(target.linear.module, self._hook(target.name, target.linear.layer))
            else:
                banks.setdefault(id(target.linear.module), (target.linear.experts, {}))[1][
                    target.linear.expert_matrix] = target
        for bank, matrices in banks.values():
            self.on_experts(bank, self._expert_hook(matrices))

    def _hook(self, name: str, layer: int):
        def record(_module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
            x = args[0]
            if layer != self._layer:
                self._seen, self._layer = {}, layer
            owner = self._seen.setdefault(id(x), (x, name))[1]
            self.shared[name] = owner
            if owner != name:
                return
            picked = x.reshape(-1, x.shape[-1])[self.rows.reshape(-1).to(x.device)].double()
            gram = picked.T @ picked
            self.grams[name] = self.grams[name].add_(gram) if name in self.grams else gram
        return record

    def _expert_hook(self, matrices: Mapping[str, Target]):
        def record(expert: int, tokens: torch.Tensor, inputs: torch.Tensor, _gate_up: torch.Tensor,
                   inner: torch.Tensor, _out: torch.Tensor) -> None:
            responses = self.rows.reshape(-1).to(tokens.device)[tokens]
            for which, x in (("gate_up", inputs), ("down", inner)):
                if which in matrices:
                    target = matrices[which]
                    picked = x[responses].detach().double()
                    if target.name not in self.grams:
                        self.grams[target.name] = picked.new_zeros(gram_shape(target))
                    self.grams[target.name][expert] += picked.T @ picked
        return record

    def start_pass(self, rows: torch.Tensor) -> None:
        self.rows, self._seen, self._layer = rows, {}, None


def gram_shape(target: Target) -> tuple[int, ...]:
    """d_in × d_in, or one such per expert."""
    d_in = target.linear.linear_shape[1]
    bank = target.linear.experts
    return (d_in, d_in) if bank is None else (bank.num_experts, d_in, d_in)


def collect_grams(model: nn.Module, targets: Sequence[Target], samples: Sequence[Sample],
                  batch_size: int) -> dict[str, torch.Tensor]:
    """Σ over all samples (all ranks) of XᵀX for each target, on the rank that owns the target only."""
    recorder = GramRecorder(targets)
    try:
        with scoring_mode(model):
            for batch in distributed.progress(rank_batches(samples, batch_size, model_device(model)),
                                              desc="activations", leave=False):
                recorder.start_pass(batch.response_rows)
                run_batch(model, batch, with_grads=False)
    finally:
        recorder.close()
    owned, reduced = {}, {}
    for target in targets:  # a shared Gram is reduced once, to the owner of the Linears that share it
        key = recorder.shared.get(target.name, target.name)
        if key not in reduced:
            local = recorder.grams.get(key)
            if local is None:  # no response token reached this Linear's input on this rank
                local = torch.zeros(gram_shape(target), dtype=torch.float64, device=model_device(model))
            reduced[key] = reduce_to_owner(local, target.owner)
        if reduced[key] is not None:
            owned[target.name] = reduced[key].cpu()
    return owned


def write_weight(param: nn.Parameter, value: torch.Tensor) -> None:
    """Replace the weight everywhere this rank stores it (its ZeRO-3 partition, or the whole tensor)."""
    start, _, valid = local_layout(param)
    local_weights(param)[:valid].copy_(value.reshape(-1)[start:start + valid])
    if is_persistent(param):  # its whole copy too
        param.data.copy_(value.view_as(param.data))


# ---------------------------------------------------------------- the stage

@dataclass
class LowRankResult:
    per_linear: dict[str, dict[str, Any]] = field(default_factory=dict)

    def gathered(self, targets: Sequence[Target]) -> LowRankResult:
        """Collective: every rank's per-Linear entries on rank 0, in the targets' order."""
        merged = distributed.merge_dicts_to_main(self.per_linear)
        if merged is not None:
            self.per_linear = {target.name: merged[target.name] for target in targets}
        return self

    def summary(self, config: LowRankConfig) -> dict[str, Any]:
        total = sum(item["total_rank"] for item in self.per_linear.values())
        removed = sum(item["removed_rank_bound"] for item in self.per_linear.values())
        return {"config": asdict(config), "variant": "safety minus utility" if config.with_utility else "plain",
                "removed_rank_bound": removed, "total_rank": total, "removed_fraction_bound": removed / max(total, 1),
                "world_size": distributed.world_size(), "per_linear": self.per_linear}


def _modify(model: nn.Module, targets: Sequence[Target], sources: Mapping[str, list[Sample]],
            config: LowRankConfig, result: LowRankResult) -> None:
    grams = {source: collect_grams(model, targets, samples, config.batch_size) for source, samples in sources.items()}
    weights = {}  # collective gathers first, so that the owners then compute side by side
    for target in targets:
        weight = weight_on_owner(target.weight, target.owner)
        if weight is not None:
            weights[target.name] = weight.cpu()
    new = {target.name: new_weight(weights.pop(target.name), target, grams, config, result) for target in targets
           if target.name in weights}
    device = model_device(model)
    for target in targets:
        value = new.pop(target.name).to(device) if target.name in new else \
            torch.empty(target.shape, dtype=target.weight.dtype, device=device)
        with torch.no_grad():
            write_weight(target.weight, broadcast_from_owner(value, target.owner))


# Linears that read the same input share its Gram, so they share an owner: q/k/v, o, gate/up, down (of the MLP, the
# shared experts and the routed experts alike)
INPUT_GROUPS = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "qkv_proj": 0, "o_proj": 1, "gate_proj": 2, "up_proj": 2,
                "gate_up_proj": 2, "down_proj": 3}


def group_owner(target: Target, world: int) -> int:
    """The rank that computes the group of Linears reading the same input as `target`: groups (not layers) are
    dealt to the ranks, shifted by one each layer (so q/k/v and gate/up, the costly groups, alternate), so that
    a layer's projections are computed side by side."""
    return (target.linear.layer + INPUT_GROUPS[target.linear.name.rsplit(".", 1)[-1]]) % world


def lowrank_sources(tokenizer: Any, config: LowRankConfig) -> dict[str, list[Sample]]:
    """The safety samples and, for the variant with utility, the utility samples."""
    sources = {"safety": load_samples(config.data, tokenizer, config.nsamples, config.seed, config.max_length,
                                      config.data_dir, config.add_eos)}
    if config.with_utility:
        sources["utility"] = load_samples(config.utility_data, tokenizer, config.nsamples, config.seed,
                                          config.max_length, config.data_dir, config.add_eos)
    return sources


def sweep_groups(targets: Sequence[Target], sequential: bool) -> list[list[Target]]:
    """The targets of each round of passes: all at once, or (`--sequential`) one layer at a time."""
    if not sequential:
        return [list(targets)]
    return [[t for t in targets if t.linear.layer == layer] for layer in sorted({t.linear.layer for t in targets})]


def new_weight(weight: torch.Tensor, target: Target, grams: Mapping[str, dict[str, torch.Tensor]],
               config: LowRankConfig, result: LowRankResult) -> torch.Tensor:
    """W' of one Linear (or of each expert of an experts' matrix) from its Grams (popped), its ranks recorded in
    `result`."""
    d_out, d_inputs = target.linear.linear_shape
    r_s, r_u = config.ranks(d_out, d_inputs)
    bound = r_s if r_u is None else min(r_s, d_out - r_u)
    bank = target.linear.experts
    count = 1 if bank is None else bank.num_experts
    result.per_linear[target.name] = {"shape": list(target.shape), "total_rank": count * min(d_out, d_inputs),
                                      "rank_safety": r_s, "rank_utility": r_u, "removed_rank_bound": count * bound}
    safety = grams["safety"].pop(target.name)
    utility = grams["utility"].pop(target.name) if "utility" in grams else None
    if bank is None:
        return modified_weight(weight, safety, utility, r_s, r_u, config.niter)
    canonical = bank.canonical(weight)  # [E, out, in]
    experts = [modified_weight(canonical[expert], safety[expert], None if utility is None else utility[expert], r_s,
                               r_u, config.niter) for expert in range(count)]
    return bank.canonical(torch.stack(experts)).contiguous()


def actsvd_targets(targets: Sequence[Target]) -> list[Target]:
    """The matrices ActSVD modifies: every scored one but the routers and the shared experts' gates."""
    return [target for target in targets if not target.linear.routes]


def low_rank_model(model: nn.Module, tokenizer: Any, config: LowRankConfig) -> LowRankResult:
    """Modify `model` in place (collective); the per-Linear ranks on rank 0 (the owners' parts merged)."""
    targets = [replace(target, owner=group_owner(target, distributed.world_size()))
               for target in actsvd_targets(targets_of(model))]
    config.validate([target.linear.linear_shape for target in targets])
    sources = lowrank_sources(tokenizer, config)
    result = LowRankResult()
    for group in sweep_groups(targets, config.sequential):
        _modify(model, group, sources, config, result)
    return result.gathered(targets)


# ---------------------------------------------------------------- layer-sharded (`--shard layers`)

def sharded_low_rank(block: LayerBlock, tokenizer: Any, config: LowRankConfig) -> LowRankResult:
    """Modify this rank's block in place (collective); the per-Linear ranks of every stage on rank 0."""
    targets = actsvd_targets(targets_of(block.model))
    config.validate([target.linear.linear_shape for target in targets])
    sources = lowrank_sources(tokenizer, config)
    result = LowRankResult()
    for group in sweep_groups(targets, config.sequential):  # every stage runs every sweep, holding its layers or not
        local = [target for target in group if target.owner == block.stage]
        grams = {source: _block_grams(block, local, samples, config.batch_size) for source, samples in
                 sources.items()}
        for target in local:
            weight = target.weight.detach()
            value = new_weight(weight.cpu(), target, grams, config, result).to(weight) if block.replica == 0 \
                else torch.empty_like(weight)
            broadcast_over_replicas(value, block.group, block.stage)
            with torch.no_grad():
                target.weight.copy_(value)
    return result.gathered(targets)


def _block_grams(block: LayerBlock, targets: Sequence[Target], samples: Sequence[Sample],
                 batch_size: int) -> dict[str, torch.Tensor]:
    """Σ XᵀX of each of this stage's targets over all samples, on replica 0's rank of the stage."""
    recorder = GramRecorder(targets)
    try:
        forward_sweep(block, replica_batches(block, samples, batch_size),
                      lambda batch: recorder.start_pass(batch.response_rows))
    finally:
        recorder.close()
    grams, unique = {}, {}
    for target in targets:  # a shared Gram is one tensor under each name that reads the same input
        key = recorder.shared.get(target.name, target.name)
        if key not in unique:  # (zeros where no response token reached it)
            unique[key] = recorder.grams.get(key, torch.zeros(gram_shape(target), dtype=torch.float64,
                                                              device=block.device))
        grams[target.name] = unique[key]
    sum_over_replicas(list(unique.values()), block.group, block.stage)  # in the targets' order on every replica
    return {name: gram.cpu() for name, gram in grams.items()}


def run_lowrank(model: ModelSource, config: LowRankConfig, out: str | Path) -> dict[str, Any]:
    """Collective: the model with its safety-only ranks removed, as an HF folder at `out` with its summary; bad
    ranks fail on the model's skeleton, before any weight is read."""
    model.check()
    check_output_dir(out)
    check_sources(config.data, config.utility_data, directory=config.data_dir)
    skeleton = model_skeleton(model.name, model.cache_dir)
    config.validate([linear.linear_shape for linear in scored_linears(skeleton) if not linear.routes])
    context = distributed.init_distributed(require_process_group=model.deepspeed is not None or model.shard != "none")
    loaded = load_source(model, context.device)
    started = time.perf_counter()
    block = block_of(loaded.model)
    if block is None:
        result = low_rank_model(loaded.model, loaded.tokenizer, config)
    else:
        result = sharded_low_rank(block, loaded.tokenizer, config)
    summary = {**result.summary(config), "model": model.name, "shard": model.shard,
               "seconds": time.perf_counter() - started}
    if block is None:
        save_hf_folder(loaded.model, loaded.tokenizer, out, {SUMMARY_FILE: summary})
    else:
        save_blocks(block, loaded.tokenizer, out, {SUMMARY_FILE: summary})
    return summary
