"""Model lineage by activation matching of MLP neurons (Zhu et al. 2025, *Independence Tests for Language Models*).

Both models read the same tokens. In a layer, every MLP neuron is the vector of its `gate_proj` outputs over those
tokens (and, separately, of its `up_proj` outputs). A linear assignment between the two models' neurons on the gate
vectors gives a permutation π_gate, on the up vectors π_up. When one model was derived from the other (fine-tuned,
neurons permuted), both assignments recover the same neuron correspondence and Spearman's test between π_gate and π_up
gives p ≈ 0; for independently trained models the two permutations are unrelated and p is uniform on (0, 1).
Fisher's method combines the layers. `--all-layers` tests every layer of one model against every layer of the other
(pruned or deeper models) and reports which layers match.

Python API with the original module's names: `match_wmats`, `mlp_matching_gate`, `mlp_matching_up`, `mlp_layers`,
`statistic_layer`, `statistic`, `statistic_all`; `trace_models` returns the whole `TraceResult`. Unlike the original,
distances are float64 (float32 at least) on the model's device, sizes come from the model, `mlp_layers` takes the two
layer indices it needs, and each model runs once over the tokens for all its layers (gate and up together).
"""
from __future__ import annotations

import argparse
import gc
import logging
import math
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from scipy import stats
from scipy.optimize import linear_sum_assignment
from torch import nn

from . import distributed
from .errors import SafeneuronsError
from .models import decoder_layers, fused_parts, is_zero3_partitioned, model_device

log = logging.getLogger(__name__)

KINDS = ("gate", "up")
PROJECTIONS = {"gate": "gate_proj", "up": "up_proj"}
SOLVERS = ("auto", "lap", "scipy")
DISTANCE_DTYPES = (torch.float32, torch.float64)
DEFAULT_ALPHA = 1e-5
DEFAULT_DATA = "demo-harmless,demo-utility"
DEFAULT_BATCH_SIZE = 8
GIB = 1024 ** 3
# A p-value of exactly 0 (identical permutations) is drawn at -log10 of the smallest positive double.
NEG_LOG10_CAP = -math.log10(np.finfo(np.float64).tiny)

TokenInputs = torch.Tensor | Iterable[torch.Tensor] | Iterable[Mapping[str, torch.Tensor]]


# ----------------------------------------------------------------------------------------------- assignment


def resolve_solver(solver: str) -> str:
    """`auto` is `lap` (LAPJV, measured faster than scipy on dense cost matrices: bench/bench_tracing.py) when the
    package is installed, else scipy's `linear_sum_assignment`."""
    if solver not in SOLVERS:
        raise SafeneuronsError(f"solver {solver!r} is not one of {', '.join(SOLVERS)}")
    if solver == "scipy":
        return solver
    try:
        import lap  # noqa: F401
    except ImportError:
        if solver == "lap":
            raise SafeneuronsError("solver 'lap' needs the lap package: pip install lap") from None
        return "scipy"
    return "lap"


def solve_assignment(cost: np.ndarray, solver: str = "auto") -> np.ndarray:
    """For each row of `cost` (no more rows than columns), its column in the minimum-cost one-to-one assignment."""
    if cost.shape[0] > cost.shape[1]:
        raise SafeneuronsError(f"cost matrix {cost.shape} has more rows than columns; transpose it")
    cost = np.ascontiguousarray(cost, dtype=np.float64)
    if resolve_solver(solver) == "lap":
        import lap

        _, columns, _ = lap.lapjv(cost, extend_cost=cost.shape[0] != cost.shape[1])
        return np.asarray(columns, dtype=np.int64)
    _, columns = linear_sum_assignment(cost)
    return np.asarray(columns, dtype=np.int64)


def pairwise_sq_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between the rows of `x` [n, d] and of `y` [m, d], in their (shared) dtype."""
    return (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * (x @ y.T)


def match_wmats(wmat0: torch.Tensor | np.ndarray, wmat1: torch.Tensor | np.ndarray, solver: str = "auto",
                dtype: torch.dtype = torch.float64, device: str | torch.device | None = None) -> np.ndarray:
    """Match the rows of `wmat0` [n0, d] to the rows of `wmat1` [n1, d] with the least total squared Euclidean
    distance (the paper's criterion), distances computed in `dtype` (float64, or float32) on `device` (default:
    `wmat0`'s). Returns `perm` of length n0 such that `wmat1[perm]` matches `wmat0`; when n0 > n1 the n0 - n1 rows
    of `wmat0` left without a partner get -1."""
    if dtype not in DISTANCE_DTYPES:
        raise SafeneuronsError(f"distance dtype {dtype} loses precision; use torch.float32 or torch.float64")
    x, y = torch.as_tensor(wmat0), torch.as_tensor(wmat1)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise SafeneuronsError(f"match_wmats needs two matrices with the same number of columns, got "
                               f"{tuple(x.shape)} and {tuple(y.shape)}")
    device = torch.device(device) if device is not None else x.device
    x, y = x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)
    if x.shape[0] <= y.shape[0]:
        return solve_assignment(pairwise_sq_distances(x, y).cpu().double().numpy(), solver)
    columns = solve_assignment(pairwise_sq_distances(y, x).cpu().double().numpy(), solver)
    perm = np.full(x.shape[0], -1, dtype=np.int64)
    perm[columns] = np.arange(y.shape[0])
    return perm


# ----------------------------------------------------------------------------------------------- activations


@dataclass
class MlpActivations:
    """Per layer, the `mlp.gate_proj` and `mlp.up_proj` outputs of one model on the traced tokens: float32
    [tokens, neurons] (a column per neuron), numpy arrays in memory or memmaps in a spill folder."""

    gate: dict[int, np.ndarray]
    up: dict[int, np.ndarray]
    n_tokens: int
    spill: tempfile.TemporaryDirectory | None = field(default=None, repr=False)  # removed with this object

    @classmethod
    def from_arrays(cls, arrays: Mapping[tuple[str, int], np.ndarray], n_tokens: int,
                    spill: tempfile.TemporaryDirectory | None) -> "MlpActivations":
        """From arrays keyed by (kind, layer)."""
        by_kind: dict[str, dict[int, np.ndarray]] = {kind: {} for kind in KINDS}
        for (kind, layer), array in arrays.items():
            by_kind[kind][layer] = array
        return cls(by_kind["gate"], by_kind["up"], n_tokens, spill)

    def get(self, kind: str, layer: int) -> np.ndarray:
        return (self.gate if kind == "gate" else self.up)[layer]

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in (*self.gate.values(), *self.up.values()))


def as_batches(inputs: TokenInputs, batch_size: int = DEFAULT_BATCH_SIZE) -> list[dict[str, torch.Tensor]]:
    """Token inputs as batches with `input_ids` and `attention_mask` (only unmasked positions are traced): a 2-D
    LongTensor [sequences, length] (cut into batches of `batch_size` rows), or an iterable of such tensors or of
    dicts holding `input_ids` and optionally `attention_mask` (for example a DataLoader's batches)."""
    if isinstance(inputs, torch.Tensor):
        inputs = inputs.split(batch_size) if inputs.ndim == 2 else [inputs]
    batches = []
    for item in inputs:
        if isinstance(item, (list, tuple)) and item and isinstance(item[0], torch.Tensor):
            item = item[0]  # a DataLoader over a TensorDataset yields [input_ids] (or [input_ids, labels])
        batch = {"input_ids": item} if isinstance(item, torch.Tensor) else dict(item)
        ids = batch.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
            raise SafeneuronsError("token inputs must be 2-D tensors of token ids [sequences, length] or dicts "
                                   "with such `input_ids`")
        mask = batch.get("attention_mask")
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids) if mask is None else mask})
    if not batches:
        raise SafeneuronsError("no token inputs to trace")
    return batches


class _Recorder:
    """Forward hooks that copy each batch's unmasked rows of gate/up outputs into preallocated arrays."""

    def __init__(self, arrays: Mapping[tuple[str, int], np.ndarray]) -> None:
        self.arrays = arrays
        self.offset = 0
        self.keep: torch.Tensor | None = None

    def hook(self, key: tuple[str, int], columns: slice):
        array = self.arrays[key]

        def record(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            rows = output.detach().reshape(-1, output.shape[-1])[self.keep][:, columns]
            array[self.offset:self.offset + rows.shape[0]] = rows.float().cpu().numpy()

        return record


def _allocate(shapes: Mapping[tuple[str, int], tuple[int, int]], memory_limit: float | None,
              spill_dir: str | Path | None) -> tuple[dict[tuple[str, int], np.ndarray], tempfile.TemporaryDirectory | None]:
    total = sum(4 * rows * cols for rows, cols in shapes.values())
    if memory_limit is None or total <= memory_limit:
        return {key: np.empty(shape, dtype=np.float32) for key, shape in shapes.items()}, None
    spill = tempfile.TemporaryDirectory(prefix="safeneurons-trace-", dir=spill_dir)
    log.info("activations take %.1f MiB, above the memory limit of %.1f MiB: spilling them to %s",
             total / 2 ** 20, memory_limit / 2 ** 20, spill.name)
    arrays = {(kind, layer): np.memmap(Path(spill.name) / f"{kind}-{layer}.f32", dtype=np.float32, mode="w+", shape=shape)
              for (kind, layer), shape in shapes.items()}
    return arrays, spill


def collect_mlp_activations(model: nn.Module, inputs: TokenInputs, layers: Iterable[int] | None = None,
                            kinds: Sequence[str] = KINDS, memory_limit: float | None = None,
                            spill_dir: str | Path | None = None) -> MlpActivations:
    """One pass of `model` over `inputs`, recording the gate and/or up outputs of `layers` (default all) as
    float32 on the CPU; above `memory_limit` bytes they go to memmaps in a temporary folder under `spill_dir`.
    Under ZeRO-3 every rank must call this with the same batches, even with no layers of its own."""
    blocks = decoder_layers(model)
    layers = sorted(set(range(len(blocks)) if layers is None else layers))
    if layers and not 0 <= layers[0] <= layers[-1] < len(blocks):
        raise SafeneuronsError(f"layers {layers} are out of range for a model with {len(blocks)} decoder layers")
    batches = as_batches(inputs)
    n_tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    modules = {(kind, layer): mlp_output(blocks[layer].mlp, kind, model.config) for layer in layers for kind in kinds}
    arrays, spill = _allocate({key: (n_tokens, rows.stop - rows.start) for key, (_, rows) in modules.items()},
                              memory_limit, spill_dir)
    if modules or is_zero3_partitioned(model):  # ZeRO-3 forwards are collective: every rank takes part
        _run_and_record(model, batches, modules, arrays)
    return MlpActivations.from_arrays(arrays, n_tokens, spill)


def mlp_output(mlp: nn.Module, kind: str, config: Any) -> tuple[nn.Module, slice]:
    """The module whose output holds the `kind` (gate or up) activations, and their columns in it: the whole
    output of gate_proj / up_proj, or one half of a fused gate_up_proj's."""
    separate = getattr(mlp, PROJECTIONS[kind], None)
    if separate is not None:
        return separate, slice(0, separate.out_features)
    return mlp.gate_up_proj, fused_parts("mlp.gate_up_proj", config)[kind]


def _run_and_record(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]],
                    modules: Mapping[tuple[str, int], nn.Module], arrays: Mapping[tuple[str, int], np.ndarray]) -> None:
    recorder = _Recorder(arrays)
    handles = [module.register_forward_hook(recorder.hook(key, rows)) for key, (module, rows) in modules.items()]
    device = model_device(model)
    decoder = model.model  # the decoder stack alone: the vocabulary projection is not needed
    try:
        with torch.no_grad():
            for batch in batches:
                mask = batch["attention_mask"].to(device)
                recorder.keep = mask.reshape(-1).bool()
                decoder(input_ids=batch["input_ids"].to(device), attention_mask=mask, use_cache=False)
                recorder.offset += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------------------------- the test


@dataclass(frozen=True)
class LayerMatch:
    """Spearman's test between the gate and up neuron assignments of `layer_base` (base) and `layer_other`."""

    layer_base: int
    layer_other: int
    pvalue: float
    spearman_rho: float
    n_matched: int  # neurons of the narrower layer, each matched into the wider one
    seconds: float


def match_neurons(acts_a: np.ndarray, acts_b: np.ndarray, solver: str = "auto",
                  device: str | torch.device = "cpu") -> np.ndarray:
    """Assignment between the neurons (columns) of two [tokens, neurons] activation matrices: the narrower side's
    neurons are matched into the wider side's, and for each of them the partner's index is returned."""
    if acts_a.shape[1] > acts_b.shape[1]:
        acts_a, acts_b = acts_b, acts_a
    return match_wmats(torch.from_numpy(np.asarray(acts_a)).T, torch.from_numpy(np.asarray(acts_b)).T,
                       solver, device=device)


def spearman_test(perm_gate: np.ndarray, perm_up: np.ndarray) -> tuple[float, float]:
    """(rho, p-value) of Spearman's test between the two permutations."""
    if len(perm_gate) < 3:
        raise SafeneuronsError(f"only {len(perm_gate)} neurons to match; Spearman's test needs at least 3")
    result = stats.spearmanr(perm_gate, perm_up)
    return float(result.statistic), float(result.pvalue)


def match_layer(base: MlpActivations, other: MlpActivations, layer_base: int, layer_other: int,
                solver: str = "auto", device: str | torch.device = "cpu") -> LayerMatch:
    started = time.perf_counter()
    perms = {kind: match_neurons(base.get(kind, layer_base), other.get(kind, layer_other), solver, device)
             for kind in KINDS}
    rho, pvalue = spearman_test(perms["gate"], perms["up"])
    return LayerMatch(layer_base, layer_other, pvalue, rho, len(perms["gate"]), time.perf_counter() - started)


def fisher_pvalue(pvalues: Sequence[float]) -> float:
    """Fisher's method: -2 Σ log p_i ~ χ²(2L) under independence (a p-value of 0 gives 0)."""
    with np.errstate(divide="ignore"):
        return float(stats.combine_pvalues(np.asarray(pvalues, dtype=np.float64), method="fisher").pvalue)


def neg_log10(pvalue: float) -> float:
    return NEG_LOG10_CAP if pvalue <= 0 else -math.log10(pvalue)


def layer_pairs(n_base: int, n_other: int, all_layers: bool) -> list[tuple[int, int]]:
    """Layer i with layer i, or with `all_layers` every (base layer, other layer) pair."""
    if all_layers:
        return [(i, j) for i in range(n_base) for j in range(n_other)]
    if n_base != n_other:
        raise SafeneuronsError(f"the base model has {n_base} layers and the other {n_other}: layer-by-layer matching "
                               f"needs the same depth; use --all-layers (statistic_all) to match every pair of layers")
    return [(i, i) for i in range(n_base)]


@dataclass
class TraceResult:
    """The test's outcome. `aligned` mode: layer i against layer i, aggregated with Fisher's method. `all-layers`
    mode: every pair, aggregated as the Bonferroni-adjusted smallest p-value (a pair is significant when
    p < alpha / pairs); `best_matches` gives each layer of the other model its best base layer."""

    mode: str
    layers: list[LayerMatch]
    aggregate_pvalue: float
    aggregate_method: str
    alpha: float
    n_tokens: int
    solver: str
    best_matches: list[dict[str, Any]] = field(default_factory=list)
    significant_pairs: list[tuple[int, int]] = field(default_factory=list)

    @property
    def dependent(self) -> bool:
        return self.aggregate_pvalue < self.alpha

    @property
    def verdict(self) -> str:
        return "dependent" if self.dependent else "independent"

    @property
    def pvalues(self) -> list[float]:
        return [match.pvalue for match in self.layers]

    @property
    def matched_pairs(self) -> list[tuple[int, int]]:
        """(base layer, other layer) for each other layer whose best base layer is significant."""
        significant = set(self.significant_pairs)
        pairs = [(best["layer_base"], best["layer_other"]) for best in self.best_matches]
        return [pair for pair in pairs if pair in significant]

    def to_json(self) -> dict[str, Any]:
        payload = {"mode": self.mode, "verdict": self.verdict, "alpha": self.alpha,
                   "aggregate_pvalue": self.aggregate_pvalue, "aggregate_method": self.aggregate_method,
                   "solver": self.solver, "n_tokens": self.n_tokens,
                   "layers": [{**asdict(match), "neg_log10_p": neg_log10(match.pvalue)} for match in self.layers]}
        if self.mode == "aligned":
            payload["fisher_pvalue"] = self.aggregate_pvalue
        else:
            payload.update(best_matches=self.best_matches, matched_pairs=self.matched_pairs,
                           significant_pairs=self.significant_pairs)
        return payload


def summarize(matches: Sequence[LayerMatch], all_layers: bool, alpha: float, n_tokens: int, solver: str) -> TraceResult:
    matches = sorted(matches, key=lambda match: (match.layer_base, match.layer_other))
    if not all_layers:
        return TraceResult("aligned", matches, fisher_pvalue([m.pvalue for m in matches]), "fisher", alpha,
                           n_tokens, solver)
    threshold = alpha / len(matches)
    best_matches = []
    for layer_other in sorted({match.layer_other for match in matches}):
        best = min((m for m in matches if m.layer_other == layer_other), key=lambda m: (m.pvalue, -m.spearman_rho))
        best_matches.append({"layer_other": layer_other, "layer_base": best.layer_base, "pvalue": best.pvalue})
    significant = [(m.layer_base, m.layer_other) for m in matches if m.pvalue < threshold]
    aggregate = min(1.0, len(matches) * min(m.pvalue for m in matches))
    return TraceResult("all-layers", matches, aggregate, "bonferroni-min", alpha, n_tokens, solver,
                       best_matches, significant)


def trace_models(base_model: nn.Module, other_model: nn.Module, inputs: TokenInputs, *, all_layers: bool = False,
                 solver: str = "auto", alpha: float = DEFAULT_ALPHA, memory_limit: float | None = None,
                 spill_dir: str | Path | None = None) -> TraceResult:
    """The whole test in one process: one pass per model over `inputs` (every layer's gate and up outputs), then
    an assignment per layer (pair) and kind, Spearman per layer (pair), and the aggregate."""
    pairs = layer_pairs(len(decoder_layers(base_model)), len(decoder_layers(other_model)), all_layers)
    batches = as_batches(inputs)
    base = collect_mlp_activations(base_model, batches, {i for i, _ in pairs}, memory_limit=memory_limit,
                                   spill_dir=spill_dir)
    other = collect_mlp_activations(other_model, batches, {j for _, j in pairs}, memory_limit=memory_limit,
                                    spill_dir=spill_dir)
    device = model_device(base_model)
    matches = [match_layer(base, other, i, j, solver, device) for i, j in pairs]
    return summarize(matches, all_layers, alpha, base.n_tokens, resolve_solver(solver))


# ----------------------------------------------------------------------------------------------- original API


def _matching(kind: str, base_model: nn.Module, ft_model: nn.Module, inputs: TokenInputs, i: int, j: int | None,
              solver: str) -> np.ndarray:
    batches = as_batches(inputs)
    j = i if j is None else j
    base = collect_mlp_activations(base_model, batches, [i], kinds=[kind]).get(kind, i)
    other = collect_mlp_activations(ft_model, batches, [j], kinds=[kind]).get(kind, j)
    return match_wmats(torch.from_numpy(base).T, torch.from_numpy(other).T, solver, device=model_device(base_model))


def mlp_matching_gate(base_model: nn.Module, ft_model: nn.Module, inputs: TokenInputs, i: int = 0,
                      j: int | None = None, solver: str = "auto") -> np.ndarray:
    """Assignment of layer `i`'s gate neurons of `base_model` to layer `j`'s (default `i`) of `ft_model` on the
    gate outputs: `perm` with ft neuron `perm[k]` matched to base neuron k (as `match_wmats`)."""
    return _matching("gate", base_model, ft_model, inputs, i, j, solver)


def mlp_matching_up(base_model: nn.Module, ft_model: nn.Module, inputs: TokenInputs, i: int = 0,
                    j: int | None = None, solver: str = "auto") -> np.ndarray:
    """As `mlp_matching_gate`, on the up-projection outputs."""
    return _matching("up", base_model, ft_model, inputs, i, j, solver)


def mlp_layers(base_model: nn.Module, ft_model: nn.Module, inputs: TokenInputs, i: int, j: int,
               solver: str = "auto") -> float:
    """p-value of layer `i` of `base_model` against layer `j` of `ft_model` (one pass per model)."""
    batches = as_batches(inputs)
    base = collect_mlp_activations(base_model, batches, [i])
    other = collect_mlp_activations(ft_model, batches, [j])
    return match_layer(base, other, i, j, solver, model_device(base_model)).pvalue


def statistic_layer(base_model: nn.Module, ft_model: nn.Module, inputs: TokenInputs, i: int = 0,
                    solver: str = "auto") -> float:
    """p-value of layer `i` of both models."""
    return mlp_layers(base_model, ft_model, inputs, i, i, solver)


def statistic(base_model: nn.Module, ft_model: nn.Module, inputs: TokenInputs, n_blocks: int | None = None,
              solver: str = "auto") -> list[float]:
    """Per-layer p-values, layer i against layer i, for the first `n_blocks` layers (default: every layer;
    aggregate them with `fisher_pvalue`, or call `trace_models` for the whole result)."""
    n_layers = len(layer_pairs(len(decoder_layers(base_model)), len(decoder_layers(ft_model)), all_layers=False))
    if n_blocks is None:
        n_blocks = n_layers
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or not 1 <= n_blocks <= n_layers:
        raise SafeneuronsError(f"n_blocks={n_blocks!r}: the models have {n_layers} layers; pass 1 to "
                               f"{n_layers}, or leave it out for every layer")
    batches = as_batches(inputs)
    base = collect_mlp_activations(base_model, batches, range(n_blocks))
    other = collect_mlp_activations(ft_model, batches, range(n_blocks))
    return [match_layer(base, other, i, i, solver, model_device(base_model)).pvalue for i in range(n_blocks)]


def statistic_all(model_1: nn.Module, model_2: nn.Module, inputs: TokenInputs, solver: str = "auto",
                  alpha: float = DEFAULT_ALPHA) -> TraceResult:
    """Every layer of `model_1` against every layer of `model_2`; `.best_matches` and `.matched_pairs` tell which
    layers correspond (for pruned or deeper models)."""
    return trace_models(model_1, model_2, inputs, all_layers=True, solver=solver, alpha=alpha)


# ----------------------------------------------------------------------------------------------- tokens


def check_same_tokenizer(tokenizer_a: Any, tokenizer_b: Any, name_a: str = "base", name_b: str = "other") -> None:
    """Refuse models that read text differently: activation matching needs both to see the same token ids."""
    vocab_a, vocab_b = tokenizer_a.get_vocab(), tokenizer_b.get_vocab()
    if vocab_a == vocab_b:
        return
    differing = sorted(token for token in vocab_a.keys() | vocab_b.keys() if vocab_a.get(token) != vocab_b.get(token))
    example = differing[0]
    raise SafeneuronsError(
        f"models {name_a} and {name_b} have different tokenizers ({len(vocab_a)} vs {len(vocab_b)} tokens, "
        f"{len(differing)} differing; token {example!r} has id {vocab_a.get(example)} vs {vocab_b.get(example)}); "
        f"activation matching needs both models to read the same token ids")


def _example_text(tokenizer: Any, example: Any) -> str:
    from .data import prompt_text

    response = example.response or ""
    return prompt_text(tokenizer, example) + (response if not response or response.startswith(" ") else " " + response)


def text_token_ids(tokenizer: Any, sources: Sequence[str], n_tokens: int, seed: int,
                   data_dir: str | None = None) -> list[int]:
    """`n_tokens` token ids from the texts (prompt and response) of the data sets, shuffled with `seed`."""
    from .data import load_examples

    examples = [example for source in sources for example in load_examples(source, data_dir)]
    random.Random(seed).shuffle(examples)
    ids: list[int] = []
    for example in examples:
        ids.extend(tokenizer(_example_text(tokenizer, example))["input_ids"])
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    log.warning("the data holds %d tokens, fewer than --n-tokens %d: tracing on all of them", len(ids), n_tokens)
    return ids


def random_token_ids(vocab_size: int, n_tokens: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(vocab_size, (n_tokens,), generator=generator).tolist()


def pack_tokens(ids: Sequence[int], length: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Token ids cut into sequences of `length` (the last one right-padded and masked), in batches."""
    sequences = [list(ids[start:start + length]) for start in range(0, len(ids), length)]
    batches = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        input_ids = torch.zeros((len(chunk), len(chunk[0])), dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, sequence in enumerate(chunk):
            input_ids[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[row, :len(sequence)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return batches


# ----------------------------------------------------------------------------------------------- CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from .cli import add_model_arguments, add_run_arguments

    add_model_arguments(parser, "--base")
    parser.add_argument("--other", required=True, help="the model tested against --base (folder, HF id, alias, demo)")
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="comma-separated data set names or files whose texts give the tokens (default %(default)s)")
    parser.add_argument("--random-tokens", action="store_true", help="uniformly random token ids instead of --data")
    parser.add_argument("--n-tokens", type=int, default=2048, help="tokens traced in all (default %(default)s)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per sequence (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="sequences per forward pass (default %(default)s)")
    parser.add_argument("--all-layers", action="store_true",
                        help="match every layer of --base against every layer of --other (pruned or deeper models)")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                        help="significance level of the aggregate p-value (default %(default)s)")
    parser.add_argument("--solver", choices=SOLVERS, default="auto",
                        help="linear assignment solver: lap (LAPJV), scipy, or auto (lap when installed) "
                             "(default %(default)s)")
    parser.add_argument("--memory-limit", type=float, default=8.0,
                        help="GiB of activations each rank keeps in memory; beyond it they spill to disk "
                             "(default %(default)s)")
    parser.add_argument("--spill-dir", default=None, help="folder for spilled activations (default: system temp)")
    add_run_arguments(parser)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("n_tokens", "max_length", "batch_size"):
        if getattr(args, name) < 1:
            raise SafeneuronsError(f"--{name.replace('_', '-')} {getattr(args, name)} must be a positive integer")
    if not 0 < args.alpha < 1:
        raise SafeneuronsError(f"--alpha {args.alpha} must lie strictly between 0 and 1")
    if args.memory_limit < 0:
        raise SafeneuronsError(f"--memory-limit {args.memory_limit} GiB must not be negative")


def _collect_model(name: str, args: argparse.Namespace, device: torch.device,
                   needed: Mapping[tuple[str, int], set[int]],
                   batches: Sequence[dict[str, torch.Tensor]], memory_limit: float) -> MlpActivations:
    from .models import load_for_inference

    loaded = load_for_inference(name, args.dtype, args.deepspeed, args.cache_dir, device)
    model, engine = loaded.model, loaded.engine
    try:
        return collect_shared(model, batches, needed, memory_limit, args.spill_dir)
    finally:
        if engine is not None and hasattr(engine, "destroy"):
            engine.destroy()
        del model, engine
        gc.collect()


def token_chunk(n_batches: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous share of the batches (contiguous, so that the chunks concatenate in token order)."""
    size = math.ceil(n_batches / world)
    return range(min(rank * size, n_batches), min((rank + 1) * size, n_batches))


def collect_shared(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]],
                   needed: Mapping[tuple[str, int], set[int]], memory_limit: float | None = None,
                   spill_dir: str | Path | None = None) -> MlpActivations:
    """Collective: the ranks split the tokens (each runs the model over a contiguous chunk of the batches, recording
    every needed layer), then each (kind, layer) output is gathered, in token order, on the ranks that `needed`
    names (the activations cross the network once instead of every rank running every token). Returns this
    rank's layers over all the tokens. Under ZeRO-3 a rank with fewer batches runs padding passes, as every forward
    is collective. A single process records its layers directly."""
    world, rank = distributed.world_size(), distributed.rank()
    layers = {layer for _, layer in needed}
    if world == 1:
        return collect_mlp_activations(model, batches, layers, memory_limit=memory_limit, spill_dir=spill_dir)
    chunks = [token_chunk(len(batches), index, world) for index in range(world)]
    local = collect_mlp_activations(model, [batches[index] for index in chunks[rank]], layers,
                                    memory_limit=memory_limit, spill_dir=spill_dir) if chunks[rank] else None
    if is_zero3_partitioned(model):
        _run_and_record(model, [batches[0]] * (len(chunks[0]) - len(chunks[rank])), {}, {})
    counts = [sum(int(batches[index]["attention_mask"].sum()) for index in chunk) for chunk in chunks]
    columns = {key: mlp_output(decoder_layers(model)[key[1]].mlp, key[0], model.config)[1] for key in needed}
    mine = {key: (sum(counts), cols.stop - cols.start) for key, cols in columns.items() if rank in needed[key]}
    arrays, spill = _allocate(mine, memory_limit, spill_dir)
    device = model_device(model) if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")
    for key in sorted(needed):
        sent = torch.zeros(max(counts), columns[key].stop - columns[key].start, device=device)
        if local is not None:
            sent[:counts[rank]] = torch.from_numpy(np.ascontiguousarray(local.get(*key))).to(device)
        for owner in sorted(needed[key]):
            parts = [torch.empty_like(sent) for _ in range(world)] if rank == owner else None
            dist.gather(sent, parts, dst=owner)
            if rank == owner:
                arrays[key][:] = torch.cat([part[:count] for part, count in zip(parts, counts)]).cpu().numpy()
    return MlpActivations.from_arrays(arrays, sum(counts), spill)


def _token_batches(args: argparse.Namespace, tokenizer: Any, max_positions: int) -> list[dict[str, torch.Tensor]]:
    if args.random_tokens:
        ids = random_token_ids(len(tokenizer), args.n_tokens, args.seed)
    else:
        sources = [source.strip() for source in args.data.split(",") if source.strip()]
        ids = text_token_ids(tokenizer, sources, args.n_tokens, args.seed, args.data_dir)
    if not ids:
        raise SafeneuronsError(f"--data {args.data} gives no tokens")
    return pack_tokens(ids, min(args.max_length, max_positions), args.batch_size)


def run(args: argparse.Namespace) -> int:
    """The ranks split the tokens of both models' passes and gather each layer's activations on the ranks whose
    layer pairs (assigned round-robin) need them; each rank solves its pairs' assignments and rank 0 gathers the
    p-values and writes the results."""
    from .models import load_config, load_tokenizer

    from .data import check_sources
    from .outputs import check_output_dir

    _check_args(args)
    check_output_dir(args.out)
    if not args.random_tokens:
        check_sources(*(source.strip() for source in args.data.split(",")), directory=args.data_dir)
    context = distributed.init_distributed(require_process_group=bool(args.deepspeed))
    solver = resolve_solver(args.solver)
    tokenizer = load_tokenizer(args.base, args.cache_dir)
    check_same_tokenizer(tokenizer, load_tokenizer(args.other, args.cache_dir), args.base, args.other)
    configs = {name: load_config(name, args.cache_dir) for name in (args.base, args.other)}
    config_base, config_other = configs[args.base], configs[args.other]
    pairs = layer_pairs(config_base.num_hidden_layers, config_other.num_hidden_layers, args.all_layers)
    mine = [pairs[index] for index in distributed.assign_round_robin(len(pairs))]
    max_positions = min(getattr(config, "max_position_embeddings", args.max_length) for config in configs.values())
    batches = _token_batches(args, tokenizer, max_positions)
    memory_limit = args.memory_limit * GIB
    needs: list[dict[tuple[str, int], set[int]]] = [{}, {}]
    for index, pair in enumerate(pairs):
        for side in (0, 1):
            for kind in KINDS:
                needs[side].setdefault((kind, pair[side]), set()).add(distributed.owner_of(index))
    base = _collect_model(args.base, args, context.device, needs[0], batches, memory_limit)
    other = _collect_model(args.other, args, context.device, needs[1], batches, max(memory_limit - base.nbytes, 0))
    try:
        matches = {(i, j): match_layer(base, other, i, j, solver, context.device)
                   for i, j in distributed.progress(mine, desc="matching layers")}
        failure = ""
    except SafeneuronsError as error:  # tell the other ranks instead of leaving them waiting in the gather
        matches, failure = {}, str(error)
    distributed.all_ranks_ok(not failure, failure)
    gathered = distributed.merge_dicts_to_main(matches)
    if gathered is None:
        return 0
    result = summarize(list(gathered.values()), args.all_layers, args.alpha, base.n_tokens, solver)
    write_results(Path(args.out), result, args)
    return 0


def write_results(out: Path, result: TraceResult, args: argparse.Namespace) -> None:
    from .outputs import atomic_file, write_json

    payload = {"base": args.base, "other": args.other, **result.to_json(),
               "data": "random tokens" if args.random_tokens else args.data, "seed": args.seed,
               "world_size": distributed.world_size()}
    with atomic_file(out / "trace.png") as tmp:
        plot_trace(result, tmp, f"{args.base} vs {args.other}")
    write_json(out / "trace.json", payload)
    print(summary_line(result))
    print(f"wrote {out / 'trace.json'} and {out / 'trace.png'}")


def summary_line(result: TraceResult) -> str:
    line = (f"{result.verdict}: {result.aggregate_method} p = {result.aggregate_pvalue:.3g} (alpha {result.alpha:g}) "
            f"over {len(result.layers)} layer pair(s), {result.n_tokens} tokens, solver {result.solver}")
    if result.mode == "all-layers":
        line += f"; matched (base, other) layers: {result.matched_pairs or 'none'}"
    return line


def plot_trace(result: TraceResult, path: Path, title: str) -> None:
    """Bars of -log10(p) per layer (aligned mode) or a heat map over layer pairs (all-layers mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    if result.mode == "aligned":
        axis.bar([m.layer_base for m in result.layers], [neg_log10(m.pvalue) for m in result.layers])
        axis.axhline(-math.log10(result.alpha), color="red", linestyle="--", label=f"alpha = {result.alpha:g}")
        axis.set_xlabel("layer")
        axis.set_ylabel("-log10 p (Spearman, gate vs up)")
        axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # beside the bars, never over them
    else:
        n_base = max(m.layer_base for m in result.layers) + 1
        n_other = max(m.layer_other for m in result.layers) + 1
        grid = np.zeros((n_base, n_other))
        for match in result.layers:
            grid[match.layer_base, match.layer_other] = neg_log10(match.pvalue)
        image = axis.imshow(grid, aspect="auto", origin="lower", cmap="viridis")
        figure.colorbar(image, ax=axis, label="-log10 p")
        axis.set_xticks(range(n_other))
        axis.set_yticks(range(n_base))
        axis.set_xlabel("layer of the other model")
        axis.set_ylabel("layer of the base model")
    axis.set_title(f"{title}: {result.verdict}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)
