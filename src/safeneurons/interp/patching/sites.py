"""Patching sites, their effects and the sweep's result (the seed's PatchingSite, PatchingEffect, ActivationPatchingResult)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from safeneurons.errors import SafeneuronsError

log = logging.getLogger(__name__)

COMPONENTS = ("residual", "attn_out", "mlp_out", "attn_head", "mlp_neuron", "expert_out", "router")
MOE_SITES = ("expert_out", "router")  # on the MoE layers of a mixture of experts (models.hooks)
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


@dataclass(frozen=True)
class PatchingSite:
    """One activation to patch: layer, component (and head for `attn_head`, MLP neurons for `mlp_neuron`), token
    position. The field names and order are the original patcher's (`PatchingSite(layer_idx, component,
    head_idx=None, token_position="last")`); `neuron_idx` (an int or a list of ints; an empty list patches nothing)
    and `expert_idx` (the routed expert of an `expert_out` site) come after them. `layer`, `head`, `neurons`,
    `expert` and `position` are the short names used throughout safeneurons."""

    layer_idx: int
    component: str = "residual"
    head_idx: int | None = None
    token_position: Position = "last"
    neuron_idx: int | tuple[int, ...] | None = None
    expert_idx: int | None = None

    def __post_init__(self) -> None:
        if self.component not in COMPONENTS:
            raise SafeneuronsError(f"component {self.component!r} is not one of {', '.join(COMPONENTS)}")
        if (self.component == "attn_head") != (self.head_idx is not None):
            raise SafeneuronsError(f"site {self.label}: a head index goes with component attn_head and only with it")
        if (self.component == "mlp_neuron") != (self.neuron_idx is not None):
            raise SafeneuronsError(f"site L{self.layer_idx}.{self.component}: neuron indexes go with component "
                                   f"mlp_neuron and only with it")
        if (self.component == "expert_out") != (self.expert_idx is not None):
            raise SafeneuronsError(f"site L{self.layer_idx}.{self.component}: an expert index goes with component "
                                   f"expert_out and only with it")
        if self.expert_idx is not None and (isinstance(self.expert_idx, bool) or not isinstance(self.expert_idx, int)
                                            or self.expert_idx < 0):
            raise SafeneuronsError(f"expert_idx {self.expert_idx!r} is not a non-negative int")
        if self.neuron_idx is not None:  # frozen and hashable: neurons are kept as a sorted tuple without repeats
            object.__setattr__(self, "neuron_idx", _neuron_tuple(self.neuron_idx))
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
    def expert(self) -> int | None:
        return self.expert_idx

    @property
    def neurons(self) -> tuple[int, ...] | None:
        return self.neuron_idx  # type: ignore[return-value]  (a tuple after __post_init__)

    @property
    def label(self) -> str:
        head = f".h{self.head}" if self.head is not None else ""
        if self.neurons is not None:
            head = f".n{self.neurons[0]}" if len(self.neurons) == 1 else f".n[{len(self.neurons)}]"
        if self.expert is not None:
            head = f".e{self.expert}"
        return f"L{self.layer}.{self.component}{head}@{self.position}"

    @property
    def cache_key(self) -> tuple[int, str]:
        return self.layer, self.component

    def to_dict(self) -> dict[str, Any]:
        fields = {"layer": self.layer, "component": self.component, "head": self.head, "position": self.position}
        if self.expert is not None:
            fields["expert"] = self.expert
        return fields if self.neurons is None else {**fields, "neurons": list(self.neurons)}


def _neuron_tuple(value: Any) -> tuple[int, ...]:
    values = [value] if isinstance(value, int) and not isinstance(value, bool) else list(value)
    if any(isinstance(index, bool) or not isinstance(index, int) for index in values):
        raise SafeneuronsError(f"neuron_idx {value!r} is not an int or a list of ints")
    return tuple(sorted(set(values)))


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
        return {**self.site.to_dict(), "patched_metric": finite_or_none(self.patched_metric),
                "effect": finite_or_none(self.direct_effect), "is_significant": self.is_significant}


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


def finite_or_none(value: float) -> float | None:
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
                layers: Sequence[int] | None = None, positions: Sequence[Position] = ("last",),
                neurons: Mapping[int, Sequence[int]] | None = None,
                experts: Mapping[int, int] | None = None) -> list[PatchingSite]:
    """Every (layer, component[, head or expert], position) combination, layer-major. `mlp_neuron` sites patch the
    `neurons` of their layer together (a layer without an entry: an empty set, which patches nothing);
    `expert_out` and `router` sites exist on the layers with routed experts (`experts`: layer -> their number)."""
    if any(component in MOE_SITES for component in components) and not experts:
        raise SafeneuronsError(f"components {', '.join(MOE_SITES)} patch routed experts; this model has none")
    if "mlp_neuron" in components and neurons is None:
        raise SafeneuronsError("component mlp_neuron needs the neurons to patch (per layer: a list of indexes, or "
                               "a neuron mask file)")
    chosen_layers = range(n_layers) if layers is None else layers
    for layer in chosen_layers:
        if not 0 <= layer < n_layers:
            raise SafeneuronsError(f"layer {layer} does not exist; the model has layers 0..{n_layers - 1}")
    sites = []
    for layer in chosen_layers:
        for component in components:
            if component in MOE_SITES and layer not in experts:
                continue  # a dense layer of a model that mixes them
            heads = range(n_heads) if component == "attn_head" else [None]
            chosen = tuple(neurons.get(layer, ())) if component == "mlp_neuron" else None
            units = range(experts[layer]) if component == "expert_out" else [None]
            sites.extend(PatchingSite(layer, component, head, position, chosen, unit)
                         for head in heads for unit in units for position in positions)
    return sites
