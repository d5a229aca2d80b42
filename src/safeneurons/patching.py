"""Activation patching of refusal circuits: which layers, components, heads and token positions carry refusal.

A *site* is one activation of one run: a decoder layer's output (`residual`), its attention output (`attn_out`),
its MLP output (`mlp_out`) or one head's slice of the input to `o_proj` (`attn_head`), at the last token, at every
token at once (`all`) or at one token index (negative indexes count from the end). Patching runs the *base*
prompt with the site's activation taken from the *source* prompt and measures a metric at the last position:

- noising: base = clean, source = corrupted; effect = (clean − patched) / (clean − corrupted)
- denoising: base = corrupted, source = clean; effect = (patched − corrupted) / (clean − corrupted)
- interchange: base = the first prompt, source = the second; effect = (patched − base) / (source − base)

Exact patching puts many sites in one forward pass: the batch holds copies of the base run, row r with site r
patched from the source run's cached activations (both runs cached once, every layer). `attribution` estimates
every site at once from one forward and one backward of the base run: (a_source − a_base) · ∂metric/∂a
(Syed et al. 2023). Sites are split across ranks and the results gathered; under ZeRO-3 every rank runs the
same number of forward passes. The refusal direction (Arditi et al. 2024) is the difference of the mean residual
at the last prompt token between harmful and harmless prompts.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from . import distributed
from .errors import SafeneuronsError
from .models import decoder_layers, forward_row_bytes, is_zero3_partitioned, layers_from, model_device

log = logging.getLogger(__name__)

COMPONENTS = ("residual", "attn_out", "mlp_out", "attn_head")
MODES = ("noising", "denoising", "interchange")
METHODS = ("exact", "attribution")
METRICS = ("refusal", "logit_diff", "direction")
# First words of refusals; their first response token is the refusal token (" I" for the demo, "I" = 306 for
# Llama-2), as in Arditi et al. Add "Sorry" or "As an" with --refusal-starts for models that open that way.
REFUSAL_STARTS = ("I cannot", "I can't", "I'm sorry", "I apologize")
RELATIVE_ZERO = 1e-6  # |clean − corrupted| below this (relative to the metric's size) has no effect to normalise
ACTIVATION_MEMORY_BUDGET = 2 * 1024 ** 3  # bytes of activations per patched batch when --batch-size is not given
MAX_AUTO_BATCH = 256
DIRECTION_FILE = "refusal_direction.pt"
DEFAULT_SIGNIFICANCE = 0.1  # |effect| above which a site counts as part of the circuit (the original's default)
FINAL_RESIDUAL = "the last decoder layer's output at the last token, before the final norm"

Position = int | str  # "last", "all", or a token index (negative: from the end)
Edit = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------- sites & results

@dataclass(frozen=True)
class PatchingSite:
    """One activation to patch: layer, component (and head for `attn_head`), token position. The field names and
    order are the original patcher's (`PatchingSite(layer_idx, component, head_idx=None, token_position="last")`);
    `layer`, `head` and `position` are the short names used throughout safeneurons."""

    layer_idx: int
    component: str = "residual"
    head_idx: int | None = None
    token_position: Position = "last"

    def __post_init__(self) -> None:
        if self.component not in COMPONENTS:
            raise SafeneuronsError(f"component {self.component!r} is not one of {', '.join(COMPONENTS)}")
        if (self.component == "attn_head") != (self.head_idx is not None):
            raise SafeneuronsError(f"site {self.label}: a head index goes with component attn_head and only with it")
        position = self.token_position
        if isinstance(position, bool) or not (isinstance(position, int) or position in ("last", "all")):
            raise SafeneuronsError(f"position {position!r} is not 'last', 'all' or a token index")

    @property
    def layer(self) -> int:
        return self.layer_idx

    @property
    def head(self) -> int | None:
        return self.head_idx

    @property
    def position(self) -> Position:
        return self.token_position

    @property
    def label(self) -> str:
        head = f".h{self.head}" if self.head is not None else ""
        return f"L{self.layer}.{self.component}{head}@{self.position}"

    @property
    def cache_key(self) -> tuple[int, str]:
        return self.layer, self.component

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "component": self.component, "head": self.head, "position": self.position}


@dataclass(frozen=True)
class PatchingEffect:
    """One patched site. `direct_effect` is the design's normalised effect (signed denominator, see the module
    docstring; NaN when the two prompts' metrics are equal); `effect` is the same number."""

    site: PatchingSite
    clean_metric: float
    corrupted_metric: float
    patched_metric: float
    direct_effect: float
    is_significant: bool  # |direct_effect| above the patcher's significance threshold

    @property
    def effect(self) -> float:
        return self.direct_effect

    def to_dict(self) -> dict[str, Any]:
        return {**self.site.to_dict(), "patched_metric": _finite_or_none(self.patched_metric),
                "effect": _finite_or_none(self.direct_effect), "is_significant": self.is_significant}


@dataclass
class ActivationPatchingResult:
    """Baselines and one effect per site. In interchange mode `clean` is the base run and `corrupted` the source.
    The original patcher's field names (`patching_mode`, `clean_baseline`, `total_effect`, `significant_sites`,
    `circuit_fraction`, `top_causal_layers`, ...) are properties of the same numbers."""

    mode: str
    method: str
    metric: str
    clean_metric: float
    corrupted_metric: float
    effects: list[PatchingEffect]
    clean_length: int
    corrupted_length: int
    n_layers: int
    significance_threshold: float = DEFAULT_SIGNIFICANCE

    @property
    def base_metric(self) -> float:
        return self.corrupted_metric if self.mode == "denoising" else self.clean_metric

    @property
    def source_metric(self) -> float:
        return self.clean_metric if self.mode == "denoising" else self.corrupted_metric

    @property
    def patching_mode(self) -> str:
        return self.mode

    @property
    def n_sites(self) -> int:
        return len(self.effects)

    @property
    def clean_baseline(self) -> float:
        return self.clean_metric

    @property
    def corrupted_baseline(self) -> float:
        return self.corrupted_metric

    @property
    def total_effect(self) -> float:
        return self.clean_metric - self.corrupted_metric

    @property
    def significant_sites(self) -> list[PatchingSite]:
        return [effect.site for effect in self.effects if effect.is_significant]

    @property
    def circuit_fraction(self) -> float:
        return len(self.significant_sites) / max(len(self.effects), 1)

    @property
    def top_causal_layers(self) -> list[int]:
        """Up to 5 layers, by the largest |effect| of any of their sites."""
        strongest: dict[int, float] = {}
        for effect in self.effects:
            if math.isfinite(effect.effect):
                strongest[effect.site.layer] = max(strongest.get(effect.site.layer, 0.0), abs(effect.effect))
        return sorted(strongest, key=lambda layer: -strongest[layer])[:5]

    def effect_of(self, site: PatchingSite) -> PatchingEffect:
        for effect in self.effects:
            if effect.site == site:
                return effect
        raise SafeneuronsError(f"site {site.label} was not patched")

    def top(self, k: int) -> list[PatchingEffect]:
        ranked = [effect for effect in self.effects if math.isfinite(effect.effect)]
        return sorted(ranked, key=lambda effect: -abs(effect.effect))[:k]

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "method": self.method, "metric": self.metric,
                "clean_metric": self.clean_metric, "corrupted_metric": self.corrupted_metric,
                "base_metric": self.base_metric, "source_metric": self.source_metric,
                "clean_length": self.clean_length, "corrupted_length": self.corrupted_length,
                "n_layers": self.n_layers, "total_effect": self.total_effect,
                "significance_threshold": self.significance_threshold,
                "n_significant": len(self.significant_sites), "circuit_fraction": self.circuit_fraction,
                "top_causal_layers": self.top_causal_layers,
                "sites": [effect.to_dict() for effect in self.effects]}


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def normalised_effect(mode: str, patched: float, clean: float, corrupted: float) -> float:
    """The design's normalised effect of one patched run; NaN (with a warning) when clean ≈ corrupted."""
    if mode == "noising":
        numerator, denominator = clean - patched, clean - corrupted
    elif mode == "denoising":
        numerator, denominator = patched - corrupted, clean - corrupted
    elif mode == "interchange":
        numerator, denominator = patched - clean, corrupted - clean
    else:
        raise SafeneuronsError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if abs(denominator) <= RELATIVE_ZERO * max(1.0, abs(clean), abs(corrupted)):
        return math.nan
    return numerator / denominator


def build_sites(n_layers: int, n_heads: int, components: Sequence[str] = ("residual",),
                layers: Sequence[int] | None = None, positions: Sequence[Position] = ("last",)) -> list[PatchingSite]:
    """Every (layer, component[, head], position) combination, layer-major."""
    chosen_layers = range(n_layers) if layers is None else layers
    for layer in chosen_layers:
        if not 0 <= layer < n_layers:
            raise SafeneuronsError(f"layer {layer} does not exist; the model has layers 0..{n_layers - 1}")
    sites = []
    for layer in chosen_layers:
        for component in components:
            heads = range(n_heads) if component == "attn_head" else [None]
            sites.extend(PatchingSite(layer, component, head, position) for head in heads for position in positions)
    return sites


# ----------------------------------------------------------------------------------------------------- metrics

@dataclass(frozen=True)
class Metric:
    """Maps the last-position logits [B, vocab] and final residual [B, hidden] of B runs to B values."""

    name: str
    compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    detail: dict[str, Any] = field(default_factory=dict)  # what the metric measures, for patching.json


def refusal_metric(token_ids: Sequence[int]) -> Metric:
    """Log-odds of the refusal tokens at the last position, log p − log(1 − p) with p = Σ p(refusal token),
    computed as logsumexp(refusal logits) − logsumexp(other logits): exact in float32 at any confidence (the
    direct form loses precision past log-odds ≈ 10 and overflows to inf past ≈ 18)."""
    ids = torch.tensor(sorted(set(token_ids)), dtype=torch.long)

    def compute(logits: torch.Tensor, _residual: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        chosen = ids.to(logits.device)
        others = logits.index_fill(-1, chosen, -math.inf)
        return torch.logsumexp(logits[:, chosen], dim=-1) - torch.logsumexp(others, dim=-1)

    return Metric("refusal", compute, {"refusal_token_ids": ids.tolist()})


def logit_diff_metric(token_a: int, token_b: int) -> Metric:
    def compute(logits: torch.Tensor, _residual: torch.Tensor) -> torch.Tensor:
        return logits[:, token_a].float() - logits[:, token_b].float()

    return Metric("logit_diff", compute, {"token_ids": [token_a, token_b]})


def direction_metric(direction: torch.Tensor) -> Metric:
    """Projection of the final residual (the last decoder layer's output, before the final norm) on a unit direction."""
    unit = direction.detach().float().flatten()
    unit = unit / unit.norm()

    def compute(_logits: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if residual.shape[-1] != unit.numel():
            raise SafeneuronsError(f"the refusal direction has {unit.numel()} entries; the model's hidden size is "
                                   f"{residual.shape[-1]}")
        return residual.float() @ unit.to(residual.device)

    return Metric("direction", compute, {"residual": FINAL_RESIDUAL})


def metric_from_fn(metric_fn: Callable[[torch.Tensor], Any], name: str = "custom") -> Metric:
    """A user metric: last-position logits of one run, shape [1, vocab] -> float (a torch scalar for attribution)."""
    def compute(logits: torch.Tensor, _residual: torch.Tensor) -> torch.Tensor:
        values = [torch.as_tensor(metric_fn(logits[row:row + 1]), dtype=torch.float32).reshape(())
                  for row in range(logits.shape[0])]
        return torch.stack(values)

    return Metric(name, compute)


def refusal_token_ids(tokenizer: Any, starts: Sequence[str] = REFUSAL_STARTS) -> list[int]:
    """The first response token of each refusal start, found by encoding prompt + refusal with the chat format."""
    from .data import format_prompt

    prompt = format_prompt(tokenizer, "Hello")
    separator = "" if prompt[-1:].isspace() else " "  # Llama-2 and the demo answer " I…"; Llama-3 starts a line
    prompt_ids = tokenizer(prompt)["input_ids"]
    found: list[int] = []
    for start in starts:
        ids = tokenizer(prompt + separator + start)["input_ids"]
        shared = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(prompt_ids), len(ids)))
        if shared >= len(ids):
            raise SafeneuronsError(f"refusal start {start!r} adds no token after the prompt")
        if ids[shared] not in found:
            found.append(ids[shared])
    return found


def token_id(tokenizer: Any, text: str) -> int:
    """The single token of `text` (for --tokens " I" " Sure")."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise SafeneuronsError(f"--tokens {text!r} is {len(ids)} tokens {pieces}; give texts that are one token each")
    return ids[0]


# ------------------------------------------------------------------------------------------------------ hooks

def _site_module(model: nn.Module, layer: int, component: str) -> nn.Module:
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise SafeneuronsError(f"layer {layer} does not exist; the model has layers 0..{len(layers) - 1}")
    block = layers[layer]
    return {"residual": block, "attn_out": block.self_attn, "mlp_out": block.mlp,
            "attn_head": block.self_attn.o_proj}[component]


def _replace_first(value: Any, edit: Edit) -> Any:
    """Modules return a tensor or a tuple whose first element is the activation (attention)."""
    if isinstance(value, tuple):
        return (edit(value[0]), *value[1:])
    return edit(value)


@contextlib.contextmanager
def _hooks(model: nn.Module, edits: dict[tuple[int, str], Edit]) -> Iterator[None]:
    """While active, `edit` rewrites each (layer, component) activation; heads edit the input of o_proj."""
    handles = []
    try:
        for (layer, component), edit in edits.items():
            module = _site_module(model, layer, component)
            if component == "attn_head":
                handles.append(module.register_forward_pre_hook(
                    lambda _module, args, edit=edit: _replace_first(args, edit)))
            else:
                handles.append(module.register_forward_hook(
                    lambda _module, _args, output, edit=edit: _replace_first(output, edit)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _keeper(store: dict, key: Any, select: Callable[[torch.Tensor], torch.Tensor]) -> Edit:
    """An edit that stores `select(activation)` under `key` and changes nothing."""
    def keep(activation: torch.Tensor) -> torch.Tensor:
        store[key] = select(activation)
        return activation
    return keep


@dataclass
class _RunOutput:
    logits: torch.Tensor  # [B, vocab] at the last position
    residual: torch.Tensor  # [B, hidden]: the last decoder layer's output at the last position (before the norm)


def _forward(model: nn.Module, edits: dict[tuple[int, str], Edit], input_ids: torch.Tensor | None = None,
             inputs_embeds: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
             start: int = 0) -> _RunOutput:
    """The model's last-position logits and final residual with `edits` applied. With `start` > 0,
    `inputs_embeds` are the hidden states entering decoder layer `start` and only layers from there run."""
    final: dict[str, torch.Tensor] = {}
    keep_final = _keeper(final, "residual", lambda activation: activation[:, -1])
    position_ids = None
    if attention_mask is not None:  # left padding: positions count real tokens only
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    # The final-norm pre-hook sees the residual after every patch of the last layer.
    handle = model.model.norm.register_forward_pre_hook(lambda _m, args: _replace_first(args, keep_final))
    try:
        with _hooks(model, edits), layers_from(model, start):  # hooks attach to the modules before the cut
            out = model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                        position_ids=position_ids, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return _RunOutput(out.logits[:, -1], final["residual"])


def _layer_inputs(model: nn.Module, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """The hidden states entering every decoder layer in one run of `input_ids` (batch 1)."""
    entries: dict[int, torch.Tensor] = {}
    handles = [layer.register_forward_pre_hook(
        lambda _module, args, kwargs, index=index: entries.__setitem__(
            index, (args[0] if args else kwargs["hidden_states"]).detach()), with_kwargs=True)
        for index, layer in enumerate(decoder_layers(model))]
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return entries


# ------------------------------------------------------------------------------------------ positions & caches

def token_slices(position: Position, base_length: int, source_length: int) -> tuple[slice, slice]:
    """The base run's and the source run's token ranges of a position; `last` and negative indexes align the
    two prompts from the end, `all` and non-negative indexes need prompts of the same length."""
    if position == "last":
        position = -1
    if position != "all" and position < 0:
        if -position > min(base_length, source_length):
            raise SafeneuronsError(f"position {position} is before the start of a prompt of "
                                   f"{min(base_length, source_length)} tokens")
        return (slice(base_length + position, base_length + position + 1),
                slice(source_length + position, source_length + position + 1))
    if base_length != source_length:
        raise SafeneuronsError(f"position {position!r} needs the two prompts to have the same number of tokens; they "
                               f"have {base_length} and {source_length}. Use position 'last' (or a negative index), "
                               f"which aligns them from the end, or prompts of equal token length")
    if position == "all":
        return slice(0, base_length), slice(0, source_length)
    if position >= base_length:
        raise SafeneuronsError(f"position {position} is past the end of the prompts ({base_length} tokens)")
    return slice(position, position + 1), slice(position, position + 1)


def _n_heads(model: nn.Module) -> int:
    return int(model.config.num_attention_heads)


def _columns(model: nn.Module, site: PatchingSite) -> slice:
    """The hidden features a site covers: all of them, or one head's slice of the input to o_proj."""
    if site.head is None:
        return slice(None)
    heads = _n_heads(model)
    if not 0 <= site.head < heads:
        raise SafeneuronsError(f"head {site.head} does not exist; the model has heads 0..{heads - 1}")
    head_dim = _site_module(model, site.layer, "attn_head").in_features // heads
    return slice(site.head * head_dim, (site.head + 1) * head_dim)


@dataclass(frozen=True)
class _Patch:
    site: PatchingSite
    base_tokens: slice
    columns: slice
    source_value: torch.Tensor  # [tokens, features] of the source run


def _cache_run(model: nn.Module, input_ids: torch.Tensor, keys: Sequence[tuple[int, str]],
               metric: Metric) -> tuple[dict[tuple[int, str], torch.Tensor], float]:
    """One forward pass: the metric and the [tokens, features] activations of every (layer, component) asked."""
    cache: dict[tuple[int, str], torch.Tensor] = {}
    with torch.no_grad():
        out = _forward(model, {key: _keeper(cache, key, lambda a: a[0].detach()) for key in keys}, input_ids)
        return cache, float(metric.compute(out.logits, out.residual)[0])


def _write_rows(patches: Sequence[tuple[int, _Patch]]) -> Edit:
    def edit(activation: torch.Tensor) -> torch.Tensor:
        patched = activation.clone()
        for row, patch in patches:
            patched[row, patch.base_tokens, patch.columns] = patch.source_value.to(patched.dtype)
        return patched
    return edit


def _patched_batch(model: nn.Module, base_ids: torch.Tensor, metric: Metric, batch: Sequence[_Patch],
                   entries: Mapping[int, torch.Tensor] | None = None) -> list[float]:
    """Row r of one forward pass is the base run with patch r; an empty batch runs the base run (ZeRO-3 filler).
    With the base run's layer inputs (`entries`), the pass starts at the batch's lowest patched layer: the layers
    below it are the base run's, unchanged by any patch."""
    rows: dict[tuple[int, str], list[tuple[int, _Patch]]] = {}
    for row, patch in enumerate(batch):
        rows.setdefault(patch.site.cache_key, []).append((row, patch))
    edits = {key: _write_rows(patches) for key, patches in rows.items()}
    size = max(len(batch), 1)
    start = min((patch.site.layer for patch in batch), default=0) if entries else 0
    with torch.no_grad():
        if start:
            out = _forward(model, edits, inputs_embeds=entries[start].expand(size, -1, -1), start=start)
        else:
            out = _forward(model, edits, base_ids.expand(size, -1))
        return metric.compute(out.logits, out.residual).tolist()[:len(batch)]


def _distributed_map(n_items: int, batch_size: int, run_batch: Callable[[list[int]], list[Any]],
                     desc: str, groups: Sequence[int] | None = None) -> list[Any]:
    """`run_batch` over the items, split across ranks in batches and gathered on every rank in item order; with
    `groups` (one key per item) a batch never mixes groups. Every rank runs the same number of batches (an empty
    one when it has none left), as ZeRO-3 requires."""
    indices = distributed.assign_round_robin(n_items)
    if groups is not None:
        indices.sort(key=lambda index: groups[index])
    runs: list[list[int]] = []
    for index in indices:
        if runs and (groups is None or groups[runs[-1][-1]] == groups[index]) and len(runs[-1]) < batch_size:
            runs[-1].append(index)
        else:
            runs.append([index])
    batches = runs
    n_steps = max(distributed.all_gather(len(batches)))
    local: dict[int, Any] = {}
    for step in distributed.progress(range(n_steps), desc=desc):
        batch = batches[step] if step < len(batches) else []
        local.update(zip(batch, run_batch(batch)))
    merged: dict[int, Any] = {}
    for part in distributed.all_gather(local):
        merged.update(part)
    return [merged[index] for index in range(n_items)]


def _attribution_batch(model: nn.Module, base_ids: torch.Tensor, metric: Metric,
                       patches: Sequence[_Patch]) -> tuple[float, list[float]]:
    """First-order patched metrics of every patch from one forward and one backward of the base run."""
    keys = sorted({patch.site.cache_key for patch in patches})
    kept: dict[tuple[int, str], torch.Tensor] = {}
    with torch.enable_grad():
        # A leaf at the embeddings makes every activation differentiable even when the weights are frozen.
        embeds = model.get_input_embeddings()(base_ids).detach().requires_grad_(True)
        out = _forward(model, {key: _keeper(kept, key, lambda a: a) for key in keys}, inputs_embeds=embeds)
        value = metric.compute(out.logits, out.residual)[0]
        if not value.requires_grad:
            raise SafeneuronsError("attribution needs a metric that is differentiable in the activations: "
                                   "metric_fn must return a torch scalar computed from the logits, not a float")
        grads = torch.autograd.grad(value, [kept[key] for key in keys], allow_unused=True)
    gradient = {key: torch.zeros_like(kept[key]) if grad is None else grad for key, grad in zip(keys, grads)}
    base_metric = float(value.detach())
    estimates = []
    for patch in patches:
        key = patch.site.cache_key
        base = kept[key][0, patch.base_tokens, patch.columns].detach()
        slope = gradient[key][0, patch.base_tokens, patch.columns]
        estimates.append(base_metric + float(((patch.source_value.to(slope.dtype) - base) * slope).float().sum()))
    return base_metric, estimates


def batch_for(row_bytes: int, budget: int) -> int:
    """Patched rows per forward pass whose working set fits `budget`: at least 1, at most MAX_AUTO_BATCH."""
    return int(min(max(budget // max(row_bytes, 1), 1), MAX_AUTO_BATCH))


def auto_batch_size(model: nn.Module, length: int) -> int:
    """Patched runs per forward pass that fit ACTIVATION_MEMORY_BUDGET (a quarter of free GPU memory on GPU)."""
    config = model.config
    row = forward_row_bytes(config.hidden_size, config.intermediate_size, config.num_attention_heads, length,
                            next(model.parameters()).element_size(), config._attn_implementation == "eager")
    budget = ACTIVATION_MEMORY_BUDGET
    device = model_device(model)
    if device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] // 4
    return batch_for(row, budget)


def _as_input_ids(ids: Any, device: torch.device, what: str) -> torch.Tensor:
    tensor = torch.as_tensor(ids, dtype=torch.long)
    if tensor.dim() == 1:
        tensor = tensor[None]
    if tensor.dim() != 2 or tensor.shape[0] != 1 or tensor.shape[1] == 0:
        raise SafeneuronsError(f"{what} input ids have shape {tuple(tensor.shape)}; expected one prompt, [tokens] "
                               f"or [1, tokens]")
    return tensor.to(device)


# ----------------------------------------------------------------------------------------------- the patcher

class ActivationPatcher:
    """Patch sites of a model between two prompts and measure a metric of the last-position output.

    The original patcher's API: `ActivationPatcher(significance_threshold=0.1, metric_fn=None).patch_sweep(model,
    clean_input_ids, corrupted_input_ids, sites=None, refusal_direction=None, mode="noising")`. The metric is, in
    this order: `metric` (a `Metric`); `metric_fn` (last-position logits [1, vocab] of one run -> float, a
    differentiable torch scalar for attribution); the projection of the final residual (not the logits) on
    `refusal_direction`; else the refusal log-odds, with `tokenizer` or the tokenizer saved with the model.
    `model=` binds a model for `patch` and `sites`."""

    def __init__(self, significance_threshold: float = DEFAULT_SIGNIFICANCE,
                 metric_fn: Callable[[torch.Tensor], Any] | None = None, *, model: nn.Module | None = None,
                 tokenizer: Any = None, metric: Metric | None = None, batch_size: int | None = None) -> None:
        if isinstance(significance_threshold, bool) or not isinstance(significance_threshold, (int, float)) \
                or not significance_threshold >= 0:
            raise SafeneuronsError(f"significance_threshold {significance_threshold!r} must be a number >= 0 (the "
                                   f"model goes to patch_sweep(model, ...) or model=)")
        if batch_size is not None and batch_size < 1:
            raise SafeneuronsError(f"batch size {batch_size} must be a positive integer")
        self.significance_threshold = float(significance_threshold)
        self.metric_fn = metric_fn
        self.model = model
        self.tokenizer = tokenizer
        self.metric = metric
        self.batch_size = batch_size

    def _bound_model(self) -> nn.Module:
        if self.model is None:
            raise SafeneuronsError("this ActivationPatcher has no model: call patch_sweep(model, ...) or build it "
                                   "with ActivationPatcher(model=model)")
        return self.model

    @property
    def n_layers(self) -> int:
        return len(decoder_layers(self._bound_model()))

    @property
    def n_heads(self) -> int:
        return _n_heads(self._bound_model())

    def sites(self, components: Sequence[str] = ("residual",), layers: Sequence[int] | None = None,
              positions: Sequence[Position] = ("last",)) -> list[PatchingSite]:
        return build_sites(self.n_layers, self.n_heads, components, layers, positions)

    def resolve_metric(self, model: nn.Module, refusal_direction: torch.Tensor | None = None) -> Metric:
        if self.metric is not None:
            return self.metric
        if self.metric_fn is not None:
            return metric_from_fn(self.metric_fn)
        if refusal_direction is not None:
            return direction_metric(refusal_direction)
        return refusal_metric(refusal_token_ids(self.tokenizer or _saved_tokenizer(model)))

    def patch_sweep(self, model: nn.Module, clean_input_ids: Any, corrupted_input_ids: Any,
                    sites: Sequence[PatchingSite] | None = None, refusal_direction: torch.Tensor | None = None,
                    mode: str = "noising", *, method: str = "exact") -> ActivationPatchingResult:
        """Patch every site (default: every layer's residual at the last token) of `model`."""
        if mode not in MODES:
            raise SafeneuronsError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        if method not in METHODS:
            raise SafeneuronsError(f"method {method!r} is not one of {', '.join(METHODS)}")
        metric = self.resolve_metric(model, refusal_direction)
        device = model_device(model)
        clean = _as_input_ids(clean_input_ids, device, "clean")
        corrupted = _as_input_ids(corrupted_input_ids, device, "corrupted")
        n_layers = len(decoder_layers(model))
        sites = list(sites) if sites is not None else build_sites(n_layers, _n_heads(model))
        if not sites:
            raise SafeneuronsError("no sites to patch")
        base, source = (corrupted, clean) if mode == "denoising" else (clean, corrupted)
        patches, source_metric = _patches(model, metric, sites, base.shape[1], source)
        if method == "exact":
            base_metric = _cache_run(model, base, [], metric)[1]
            batch_size = self.batch_size or auto_batch_size(model, base.shape[1])
            # under ZeRO-3 every pass runs the whole module order (its parameter hooks follow it)
            entries = None if is_zero3_partitioned(model) else _layer_inputs(model, base)
            # a batch starts at its lowest layer: batches of one layer's sites recompute nothing below it
            patched = _distributed_map(
                len(patches), batch_size,
                lambda batch: _patched_batch(model, base, metric, [patches[i] for i in batch], entries),
                desc="patching", groups=None if entries is None else [patch.site.layer for patch in patches])
        else:
            base_metric, patched = _attribution_batch(model, base, metric, patches)
        clean_metric, corrupted_metric = ((source_metric, base_metric) if mode == "denoising"
                                          else (base_metric, source_metric))
        effects = [self._effect(site, value, mode, clean_metric, corrupted_metric)
                   for site, value in zip(sites, patched)]
        if effects and all(math.isnan(effect.effect) for effect in effects):
            log.warning("the clean and corrupted prompts give the same %s metric (%.6g and %.6g): effects are "
                        "undefined (NaN); choose prompts that differ in the metric", metric.name,
                        clean_metric, corrupted_metric)
        return ActivationPatchingResult(mode, method, metric.name, clean_metric, corrupted_metric, effects,
                                        clean.shape[1], corrupted.shape[1], n_layers, self.significance_threshold)

    def patch(self, clean_input_ids: Any, corrupted_input_ids: Any, sites: Sequence[PatchingSite] | None = None,
              mode: str = "noising", method: str = "exact") -> ActivationPatchingResult:
        """`patch_sweep` on the bound model (`model=`)."""
        return self.patch_sweep(self._bound_model(), clean_input_ids, corrupted_input_ids, sites, None, mode,
                                method=method)

    def _effect(self, site: PatchingSite, patched: float, mode: str, clean: float, corrupted: float) -> PatchingEffect:
        effect = normalised_effect(mode, patched, clean, corrupted)
        significant = math.isfinite(effect) and abs(effect) > self.significance_threshold
        return PatchingEffect(site, clean, corrupted, patched, effect, significant)

    @staticmethod
    def format_report(result: ActivationPatchingResult, top: int = 15,
                      token_labels: Sequence[str] | None = None) -> str:
        return format_report(result, top, token_labels)


def _saved_tokenizer(model: nn.Module) -> Any:
    """The tokenizer stored with the model's weights (for the default refusal metric)."""
    from transformers import AutoTokenizer

    where = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    try:
        return AutoTokenizer.from_pretrained(where, local_files_only=True)
    except (OSError, ValueError):
        raise SafeneuronsError(f"no metric given and no tokenizer saved with the model ({where or 'no path'!r}) "
                               f"for the refusal metric: pass metric_fn, refusal_direction or tokenizer=") from None


def _patches(model: nn.Module, metric: Metric, sites: Sequence[PatchingSite], base_length: int,
             source: torch.Tensor) -> tuple[list[_Patch], float]:
    """Each site's base-run token range and features with the source run's activation, and the source run's
    metric (one cached pass for every layer)."""
    keys = sorted({site.cache_key for site in sites})
    for layer, component in keys:  # an unknown layer fails here, before any forward pass
        _site_module(model, layer, component)
    columns = [_columns(model, site) for site in sites]
    slices = [token_slices(site.position, base_length, source.shape[1]) for site in sites]
    cache, source_metric = _cache_run(model, source, keys, metric)
    patches = [_Patch(site, base_tokens, cols, cache[site.cache_key][source_tokens, cols])
               for site, cols, (base_tokens, source_tokens) in zip(sites, columns, slices)]
    return patches, source_metric


def patch_sweep(model: nn.Module, clean_input_ids: Any, corrupted_input_ids: Any,
                sites: Sequence[PatchingSite] | None = None, refusal_direction: torch.Tensor | None = None,
                mode: str = "noising", *, metric_fn: Callable[[torch.Tensor], Any] | None = None,
                tokenizer: Any = None, method: str = "exact", batch_size: int | None = None,
                significance_threshold: float = DEFAULT_SIGNIFICANCE) -> ActivationPatchingResult:
    """`ActivationPatcher(...).patch_sweep(...)` in one call."""
    patcher = ActivationPatcher(significance_threshold, metric_fn, tokenizer=tokenizer, batch_size=batch_size)
    return patcher.patch_sweep(model, clean_input_ids, corrupted_input_ids, sites, refusal_direction, mode,
                               method=method)


# ----------------------------------------------------------------------------------- prompt sets & direction

def _run_prompts(model: nn.Module, tokenizer: Any, prompts: Sequence[str],
                 layer: int | None = None) -> tuple[_RunOutput, torch.Tensor | None]:
    """One left-padded forward pass of chat-formatted prompts; with `layer`, also that layer's output at the
    last prompt token."""
    device = model_device(model)
    encoded = tokenizer(list(prompts), padding=True, padding_side="left", return_tensors="pt")
    states: dict[str, torch.Tensor] = {}
    keep = _keeper(states, "layer", lambda activation: activation[:, -1].detach())
    with torch.no_grad():
        out = _forward(model, {} if layer is None else {(layer, "residual"): keep},
                       encoded["input_ids"].to(device), attention_mask=encoded["attention_mask"].to(device))
    return out, states.get("layer")


def prompt_metrics(model: nn.Module, tokenizer: Any, prompts: Sequence[str], metric: Metric,
                   batch_size: int = 16) -> list[float]:
    """The metric of each chat-formatted prompt's own run (prompts split across ranks)."""
    def run_batch(indices: list[int]) -> list[float]:
        out, _ = _run_prompts(model, tokenizer, [prompts[i] for i in indices] or prompts[:1])
        return metric.compute(out.logits, out.residual).tolist()[:len(indices)]

    return _distributed_map(len(prompts), batch_size, run_batch, desc="metric")


def last_token_residuals(model: nn.Module, tokenizer: Any, prompts: Sequence[str], layer: int,
                         batch_size: int = 16) -> torch.Tensor:
    """[prompts, hidden]: decoder layer `layer`'s output at each prompt's last token (fp32, on the CPU)."""
    def run_batch(indices: list[int]) -> list[torch.Tensor]:
        _, states = _run_prompts(model, tokenizer, [prompts[i] for i in indices] or prompts[:1], layer)
        return list(states.float().cpu()[:len(indices)])

    return torch.stack(_distributed_map(len(prompts), batch_size, run_batch, desc=f"residuals of layer {layer}"))


@dataclass
class RefusalDirection:
    """Mean residual of harmful minus harmless prompts at the last prompt token of one layer (Arditi et al.)."""

    direction: torch.Tensor  # [hidden], not normalised
    layer: int
    harmful_projection: float  # mean projection of the harmful prompts' residuals on the unit direction
    harmless_projection: float
    n_harmful: int
    n_harmless: int

    def summary(self) -> dict[str, Any]:
        return {"layer": self.layer, "hidden_size": self.direction.numel(), "norm": float(self.direction.norm()),
                "harmful_projection_mean": self.harmful_projection,
                "harmless_projection_mean": self.harmless_projection,
                "n_harmful": self.n_harmful, "n_harmless": self.n_harmless,
                "residual": "output of the decoder layer at the last prompt token, before the final norm"}


def compute_refusal_direction(model: nn.Module, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str],
                              layer: int | None = None, batch_size: int = 16) -> RefusalDirection:
    """Difference of mean residuals; `layer` defaults to the last one, whose output is the final residual that
    the `direction` metric projects."""
    n_layers = len(decoder_layers(model))
    layer = n_layers - 1 if layer is None else layer
    if not 0 <= layer < n_layers:
        raise SafeneuronsError(f"layer {layer} does not exist; the model has layers 0..{n_layers - 1}")
    if not harmful or not harmless:
        raise SafeneuronsError("the refusal direction needs at least one harmful and one harmless prompt")
    harmful_states = last_token_residuals(model, tokenizer, harmful, layer, batch_size)
    harmless_states = last_token_residuals(model, tokenizer, harmless, layer, batch_size)
    direction = harmful_states.mean(0) - harmless_states.mean(0)
    unit = direction / direction.norm()
    return RefusalDirection(direction, layer, float((harmful_states @ unit).mean()),
                            float((harmless_states @ unit).mean()), len(harmful), len(harmless))


def load_direction(path: str | Path) -> torch.Tensor:
    """A refusal direction from `patch --compute-direction` (.pt) or a .safetensors/.pt holding one vector."""
    path = Path(path)
    if not path.is_file():
        raise SafeneuronsError(f"refusal direction file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        loaded: Any = tensors.get("direction", next(iter(tensors.values()), None))
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several unrelated types for a file that is not a checkpoint
            raise SafeneuronsError(f"refusal direction file {path} is not a torch file ({error})") from None
        loaded = loaded.get("direction") if isinstance(loaded, dict) else loaded
    if not isinstance(loaded, torch.Tensor) or loaded.dim() != 1 or not bool(loaded.norm() > 0):
        raise SafeneuronsError(f"{path} holds no non-zero 1-D refusal direction (expected a [hidden] tensor)")
    return loaded.float()


# --------------------------------------------------------------------------------------------- report & plot

def _position_label(position: Position, token_labels: Sequence[str] | None) -> str:
    if isinstance(position, int) and token_labels and -len(token_labels) <= position < len(token_labels):
        return f"{position} {token_labels[position]!r}"
    return str(position)


def _column_label(site: PatchingSite, token_labels: Sequence[str] | None, several_positions: bool) -> str:
    position = _position_label(site.position, token_labels)
    if site.head is None:
        return position
    return f"h{site.head}@{position}" if several_positions else f"h{site.head}"


def _format_effect(value: float) -> str:
    return f"{value:+.3f}" if math.isfinite(value) else "nan"


def format_report(result: ActivationPatchingResult, top: int = 10, token_labels: Sequence[str] | None = None) -> str:
    """Baselines, the largest |effect| of each layer and component, and the `top` sites."""
    base, source = ("base", "source") if result.mode == "interchange" else ("clean", "corrupted")
    lines = [f"Activation patching: mode {result.mode}, method {result.method}, metric {result.metric}",
             f"  {base} metric {result.clean_metric:.4f} ({result.clean_length} tokens), "
             f"{source} metric {result.corrupted_metric:.4f} ({result.corrupted_length} tokens)",
             f"  {len(result.effects)} sites; effect 1 = the site alone carries the whole difference, 0 = none",
             f"  significant sites (|effect| > {result.significance_threshold:g}): {len(result.significant_sites)} of "
             f"{result.n_sites} ({result.circuit_fraction:.0%}); top causal layers: {result.top_causal_layers}", ""]
    components = [c for c in COMPONENTS if any(e.site.component == c for e in result.effects)]
    layers = sorted({effect.site.layer for effect in result.effects})
    lines.append("largest |effect| per layer: " + "  ".join(f"{c:>10}" for c in components))
    for layer in layers:
        cells = []
        for component in components:
            values = [e.effect for e in result.effects if e.site.layer == layer and e.site.component == component
                      and math.isfinite(e.effect)]
            cells.append(f"{_format_effect(max(values, key=abs)) if values else '-':>10}")
        lines.append(f"  layer {layer:>3}{'':>17}" + "  ".join(cells))
    lines += ["", f"top {min(top, len(result.effects))} sites by |effect|:"]
    for effect in result.top(top):
        site = effect.site
        head = f" head {site.head}" if site.head is not None else ""
        lines.append(f"  layer {site.layer:>3} {site.component:<9}{head} position "
                     f"{_position_label(site.position, token_labels)}: effect {_format_effect(effect.effect)} "
                     f"(patched metric {effect.patched_metric:.4f}){' [SIG]' if effect.is_significant else ''}")
    return "\n".join(lines)


def plot_heatmap(result: ActivationPatchingResult, path: str | Path,
                 token_labels: Sequence[str] | None = None) -> None:
    """One panel per component: layers × positions (or × heads for attn_head), colour = effect."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .outputs import atomic_file

    components = [c for c in COMPONENTS if any(e.site.component == c for e in result.effects)]
    several_positions = len({effect.site.position for effect in result.effects}) > 1
    layers = sorted({effect.site.layer for effect in result.effects})
    finite = [abs(e.effect) for e in result.effects if math.isfinite(e.effect)]
    scale = max(finite, default=1.0) or 1.0
    width = max(4.0, 2.5 + 0.35 * len(result.effects) / len(layers))
    figure, axes = plt.subplots(1, len(components), squeeze=False, figsize=(width, 1.5 + 0.35 * len(layers)))
    for axis, component in zip(axes[0], components):
        effects = [effect for effect in result.effects if effect.site.component == component]
        columns = list(dict.fromkeys(_column_label(e.site, token_labels, several_positions) for e in effects))
        grid = torch.full((len(layers), len(columns)), math.nan)
        for effect in effects:
            column = columns.index(_column_label(effect.site, token_labels, several_positions))
            grid[layers.index(effect.site.layer), column] = effect.effect
        image = axis.imshow(grid.numpy(), cmap="RdBu_r", vmin=-scale, vmax=scale, aspect="auto", origin="lower")
        axis.set_title(component)
        axis.set_xticks(range(len(columns)), columns, rotation=90, fontsize=7)
        axis.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        axis.set_ylabel("layer")
        axis.set_xlabel("head" if component == "attn_head" and not several_positions else
                        "head @ token position" if component == "attn_head" else "token position")
    figure.colorbar(image, ax=axes[0].tolist(), label=f"effect ({result.mode}, {result.metric})")
    figure.suptitle(f"Activation patching: {result.mode}, {result.method}")
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)


# ------------------------------------------------------------------------------------------------------ CLI

def configure_parser(parser: argparse.ArgumentParser) -> None:
    from .cli import add_model_arguments, add_run_arguments

    add_model_arguments(parser, "--model")
    add_run_arguments(parser)
    prompts = parser.add_argument_group("prompts (chat-formatted unless already in chat format or --raw)")
    prompts.add_argument("--clean", "--base", default=None, metavar="TEXT",
                         help="clean prompt (the base run of interchange), e.g. a harmful request")
    prompts.add_argument("--clean-file", default=None, metavar="FILE", help="the clean prompt from a text file")
    prompts.add_argument("--corrupted", "--source", default=None, metavar="TEXT",
                         help="corrupted prompt (the source of interchange), e.g. a harmless request")
    prompts.add_argument("--corrupted-file", default=None, metavar="FILE", help="the corrupted prompt from a file")
    prompts.add_argument("--raw", action="store_true", help="tokenise the prompts as given, without the chat format")
    sweep = parser.add_argument_group("sites and metric")
    sweep.add_argument("--mode", default="noising", choices=MODES, help="default %(default)s")
    sweep.add_argument("--method", default="exact", choices=METHODS,
                       help="exact (batched patched runs) or attribution (first order, one forward + one backward) "
                            "(default %(default)s)")
    sweep.add_argument("--components", default="residual",
                       help=f"comma list of {','.join(COMPONENTS)} (default %(default)s)")
    sweep.add_argument("--layers", default="all", help="all, or a comma list of layer indexes (default %(default)s)")
    sweep.add_argument("--positions", default="last",
                       help="comma list of: last, all (every token at once), each (one site per token), a token "
                            "index (negative: from the end) (default %(default)s)")
    sweep.add_argument("--metric", default="refusal", choices=METRICS, help="default %(default)s")
    sweep.add_argument("--tokens", nargs=2, default=None, metavar=("A", "B"),
                       help="logit_diff: logit(A) − logit(B) of two one-token texts, e.g. ' I' ' Sure'")
    sweep.add_argument("--direction", default=None, metavar="FILE",
                       help="direction metric: refusal direction file (from --compute-direction)")
    sweep.add_argument("--refusal-starts", nargs="+", default=list(REFUSAL_STARTS), metavar="TEXT",
                       help="refusal metric: refusal openings whose first token counts (default: %(default)s)")
    sweep.add_argument("--batch-size", type=int, default=None,
                       help="patched runs per forward pass (default: as many as fit a memory bound)")
    sweep.add_argument("--top", type=int, default=15,
                       help="sites listed in the report; with --method attribution, also the number of its top "
                            "sites patched exactly beside their estimates (default %(default)s)")
    sweep.add_argument("--significance-threshold", type=float, default=DEFAULT_SIGNIFICANCE,
                       help="|effect| above which a site is significant (default %(default)s)")
    direction = parser.add_argument_group("refusal direction (--compute-direction)")
    direction.add_argument("--compute-direction", action="store_true",
                           help="write OUT/refusal_direction.pt: mean residual of harmful minus harmless prompts")
    direction.add_argument("--harmful", default="demo-harmful", help="harmful prompts (default %(default)s)")
    direction.add_argument("--harmless", default="demo-harmless", help="harmless prompts (default %(default)s)")
    direction.add_argument("--n-prompts", type=int, default=64, help="prompts of each set (default %(default)s)")
    direction.add_argument("--layer", type=int, default=None,
                           help="layer whose output is averaged (default: the last, i.e. the final residual)")


def _parse_components(text: str) -> list[str]:
    components = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or not components:
        raise SafeneuronsError(f"--components {text!r}: expected a comma list of {', '.join(COMPONENTS)}")
    return components


def _parse_layers(text: str) -> list[int] | None:
    if text.strip() == "all":
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SafeneuronsError(f"--layers {text!r}: expected all or layer indexes separated by commas") from None


def _parse_positions(text: str, length: int) -> list[Position]:
    error = SafeneuronsError(f"--positions {text!r}: expected a comma list of last, all, each or token indexes")
    positions: list[Position] = []
    for part in (part.strip() for part in text.split(",") if part.strip()):
        if part in ("last", "all"):
            positions.append(part)
        elif part == "each":
            positions.extend(range(length))
        elif part.lstrip("-").isdigit():
            positions.append(int(part))
        else:
            raise error
    if not positions:
        raise error
    return positions


def _check_args(args: argparse.Namespace) -> None:
    """Bad input fails before any model is loaded."""
    if args.compute_direction:
        if args.n_prompts < 1:
            raise SafeneuronsError(f"--n-prompts {args.n_prompts} must be a positive integer")
        return
    for name in ("clean", "corrupted"):
        given = [flag for flag in (name, f"{name}_file") if getattr(args, flag) is not None]
        if len(given) != 1:
            raise SafeneuronsError(f"give exactly one of --{name} TEXT and --{name}-file FILE")
    _parse_components(args.components)
    _parse_layers(args.layers)
    _parse_positions(args.positions, 1)
    if args.metric == "logit_diff" and not args.tokens:
        raise SafeneuronsError("--metric logit_diff needs --tokens A B (two one-token texts)")
    if args.metric == "direction" and not args.direction:
        raise SafeneuronsError("--metric direction needs --direction FILE (from `safeneurons patch --compute-direction`)")
    if args.batch_size is not None and args.batch_size < 1:
        raise SafeneuronsError(f"--batch-size {args.batch_size} must be a positive integer")
    if args.top < 1:
        raise SafeneuronsError(f"--top {args.top} must be a positive integer")
    if not args.significance_threshold >= 0:
        raise SafeneuronsError(f"--significance-threshold {args.significance_threshold} must be >= 0")


def _prompt_from_args(args: argparse.Namespace, name: str, tokenizer: Any) -> str:
    from .data import as_example, prompt_text

    path = getattr(args, f"{name}_file")
    if path is not None:
        if not Path(path).is_file():
            raise SafeneuronsError(f"--{name}-file {path} does not exist")
        text = Path(path).read_text().strip()
    else:
        text = getattr(args, name)
    if not text.strip():
        raise SafeneuronsError(f"the {name} prompt is empty")
    return text if args.raw else prompt_text(tokenizer, as_example(text))


def _metric_from_args(args: argparse.Namespace, tokenizer: Any) -> Metric:
    if args.metric == "logit_diff":
        return logit_diff_metric(token_id(tokenizer, args.tokens[0]), token_id(tokenizer, args.tokens[1]))
    if args.metric == "direction":
        return direction_metric(load_direction(args.direction))
    return refusal_metric(refusal_token_ids(tokenizer, args.refusal_starts))


def _publish(out: str, files: dict[str, Callable[[Path], None]]) -> None:
    """Rank 0 writes every file into the staging folder, then moves them into `out` together."""
    from .outputs import discard_staging, publish_dir, staging_dir

    staging = staging_dir(out, fresh=True)
    try:
        for name, write in files.items():
            write(staging / name)
    except BaseException:
        discard_staging(out)
        raise
    publish_dir(out)


def attribution_check(patcher: ActivationPatcher, model: nn.Module, clean: torch.Tensor, corrupted: torch.Tensor,
                      estimate: ActivationPatchingResult, k: int) -> list[dict[str, Any]]:
    """The exact effects of the `k` sites that attribution ranks highest (one batched pass), beside the estimates,
    so that a user sees how far the first-order estimate is off."""
    chosen = estimate.top(k)
    if not chosen:
        return []
    exact = patcher.patch_sweep(model, clean, corrupted, [effect.site for effect in chosen], mode=estimate.mode)
    return [{**guess.site.to_dict(), "attribution_effect": _finite_or_none(guess.effect),
             "exact_effect": _finite_or_none(truth.effect)} for guess, truth in zip(chosen, exact.effects)]


def format_attribution_check(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["", f"attribution against exact patching, its top {len(rows)} sites:"]
    for row in rows:
        head = f" head {row['head']}" if row["head"] is not None else ""
        guess, truth = (_format_effect(math.nan if v is None else v)
                        for v in (row["attribution_effect"], row["exact_effect"]))
        lines.append(f"  layer {row['layer']:>3} {row['component']:<9}{head} position {row['position']}: "
                     f"attribution {guess}, exact {truth}")
    return "\n".join(lines)


def _run_patching(args: argparse.Namespace, model: nn.Module, tokenizer: Any) -> None:
    from .outputs import write_json

    clean = tokenizer(_prompt_from_args(args, "clean", tokenizer), return_tensors="pt")["input_ids"]
    corrupted = tokenizer(_prompt_from_args(args, "corrupted", tokenizer), return_tensors="pt")["input_ids"]
    base = corrupted if args.mode == "denoising" else clean
    metric = _metric_from_args(args, tokenizer)
    patcher = ActivationPatcher(args.significance_threshold, model=model, tokenizer=tokenizer, metric=metric,
                                batch_size=args.batch_size)
    sites = patcher.sites(_parse_components(args.components), _parse_layers(args.layers),
                          _parse_positions(args.positions, base.shape[1]))
    result = patcher.patch(clean, corrupted, sites, args.mode, args.method)
    check = attribution_check(patcher, model, clean, corrupted, result, args.top) if args.method == "attribution" \
        else []
    if not distributed.is_main():
        return
    labels = [tokenizer.decode([token]) for token in base[0].tolist()]
    report = format_report(result, args.top, labels) + (format_attribution_check(check) if check else "")
    payload = {**result.to_dict(), "model": args.model, "metric_detail": metric.detail,
               "base_tokens": labels, "world_size": distributed.world_size()}
    if check:
        payload["exact_check"] = check
    _publish(args.out, {"patching.json": lambda path: write_json(path, payload),
                        "patching.png": lambda path: plot_heatmap(result, path, labels),
                        "report.txt": lambda path: path.write_text(report + "\n")})
    print(report)
    print(f"-> {args.out}/patching.json, patching.png, report.txt")


def _run_direction(args: argparse.Namespace, model: nn.Module, tokenizer: Any) -> None:
    from .data import load_prompts
    from .outputs import write_json

    harmful = load_prompts(args.harmful, tokenizer, args.n_prompts, args.data_dir)
    harmless = load_prompts(args.harmless, tokenizer, args.n_prompts, args.data_dir)
    found = compute_refusal_direction(model, tokenizer, harmful, harmless, args.layer)
    if not distributed.is_main():
        return
    summary = {**found.summary(), "model": args.model, "harmful": args.harmful, "harmless": args.harmless}

    def save_tensor(path: Path) -> None:
        torch.save({"direction": found.direction.contiguous(), "layer": found.layer}, path)

    _publish(args.out, {DIRECTION_FILE: save_tensor,
                        "refusal_direction.json": lambda path: write_json(path, summary)})
    print(f"refusal direction at layer {found.layer}: norm {summary['norm']:.4f}; mean projection harmful "
          f"{found.harmful_projection:.4f}, harmless {found.harmless_projection:.4f} -> {args.out}/{DIRECTION_FILE}")


def run(args: argparse.Namespace) -> int:
    from .data import check_sources
    from .outputs import check_output_dir

    _check_args(args)
    check_output_dir(args.out)
    if args.compute_direction:
        check_sources(args.harmful, args.harmless, directory=args.data_dir)
    context = distributed.init_distributed(require_process_group=args.deepspeed is not None)
    from .models import load_for_inference

    loaded = load_for_inference(args.model, args.dtype, args.deepspeed, args.cache_dir, context.device)
    if args.compute_direction:
        _run_direction(args, loaded.model, loaded.tokenizer)
    else:
        _run_patching(args, loaded.model, loaded.tokenizer)
    return 0
