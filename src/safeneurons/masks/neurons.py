"""Neuron sets: per decoder layer, indexes of the MLP's intermediate units (the input columns of `down_proj`).
From indexes on the command line, from a `score` mask file, as the top k% of a ranking, or at random."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from safeneurons.errors import SafeneuronsError
from safeneurons.models.structure import mlp_widths

NeuronSets = dict[int, list[int]]  # layer -> sorted neuron indexes
MASK_RULES = ("rows", "columns")
MASK_RULE_HELP = ("rows: neuron j when row j of gate_proj or of up_proj is masked whole (what `score --granularity "
                  "neuron` selects); columns: when column j of down_proj is masked whole")


def parse_neurons(items: Sequence[str]) -> NeuronSets:
    """`LAYER:INDEXES` items, INDEXES a comma list of neurons and ranges (`3:0,5,10-19`)."""
    sets: NeuronSets = {}
    for item in items:
        layer_text, _, indexes = item.partition(":")
        try:
            layer = int(layer_text)
            chosen = []
            for part in filter(None, (piece.strip() for piece in indexes.split(","))):
                first, _, last = part.partition("-")
                chosen.extend(range(int(first), int(last or first) + 1))
        except ValueError:
            raise SafeneuronsError(f"--neurons {item!r}: expected LAYER:INDEXES, e.g. 3:0,5,10-19, or a mask "
                                   f"file") from None
        sets[layer] = sorted(set(sets.get(layer, []) + chosen))
    return sets


def resolve_neurons(items: Sequence[str], model_config: Any, rule: str = "rows") -> NeuronSets:
    """`--neurons`: LAYER:INDEXES items or one mask file, checked against the model's config (no weights read)."""
    from pathlib import Path

    if len(items) == 1 and ":" not in items[0]:
        if not Path(items[0]).exists():
            raise SafeneuronsError(f"--neurons {items[0]}: no such mask file, and not LAYER:INDEXES")
        return neurons_from_masks(items[0], model_config, rule)
    sets = parse_neurons(items)
    check_sets(sets, model_config.num_hidden_layers, mlp_widths(model_config))
    return sets


def check_sets(sets: Mapping[int, Sequence[int]], n_layers: int, width: int | Mapping[int, int]) -> None:
    """Every layer and neuron exists in a model of `n_layers` layers and `width` MLP neurons (from its config), one
    width for every layer or per layer (an MoE layer's neurons are every expert's units)."""
    for layer, indexes in sets.items():
        if not 0 <= layer < n_layers:
            raise SafeneuronsError(f"layer {layer} does not exist; the model has layers 0..{n_layers - 1}")
        layer_width = width[layer] if isinstance(width, Mapping) else width
        bad = [index for index in indexes if not 0 <= index < layer_width]
        if bad:
            raise SafeneuronsError(f"neuron {bad[0]} of layer {layer} does not exist; the MLP has neurons "
                                   f"0..{layer_width - 1}")


def _mask_of(reader: Any, name: str, expected: tuple[int, int], source: str) -> torch.Tensor | None:
    if name not in reader.names:
        return None
    shape = tuple(reader.shape(name))
    if shape != expected:
        raise SafeneuronsError(f"mask {name} in {source} has shape {shape}; this model's is {expected}: the masks "
                               f"come from another model")
    return reader.get(name).bool()


def _layer_mask_neurons(reader: Any, layer: int, config: Any, rule: str, source: str) -> list[int]:
    width, hidden = int(config.intermediate_size), int(config.hidden_size)
    prefix = f"model.layers.{layer}.mlp."
    if rule == "columns":
        down = _mask_of(reader, prefix + "down_proj.weight", (hidden, width), source)
        return [] if down is None else down.all(0).nonzero().flatten().tolist()
    rows = []
    fused = _mask_of(reader, prefix + "gate_up_proj.weight", (2 * width, hidden), source)
    if fused is not None:
        rows = [fused[:width], fused[width:]]
    for part in ("gate_proj", "up_proj"):
        mask = _mask_of(reader, prefix + f"{part}.weight", (width, hidden), source)
        rows += [] if mask is None else [mask]
    whole = [mask.all(1) for mask in rows]
    return [] if not whole else torch.stack(whole).any(0).nonzero().flatten().tolist()


def neurons_from_masks(source: str, config: Any, rule: str = "rows") -> NeuronSets:
    """The MLP neurons a `score` mask file selects (see MASK_RULE_HELP), checked against the model's config."""
    from safeneurons.masks.io import MaskReader

    if rule not in MASK_RULES:
        raise SafeneuronsError(f"--neuron-rule {rule!r} is not one of {', '.join(MASK_RULES)}")
    reader = MaskReader(source)
    n_layers = int(config.num_hidden_layers)
    beyond = [name for name in reader.names if name.startswith("model.layers.")
              and int(name.split(".")[2]) >= n_layers]
    if beyond:
        raise SafeneuronsError(f"mask {beyond[0]} in {source} names a layer this model ({n_layers} layers) does not "
                               f"have: the masks come from another model")
    return {layer: _layer_mask_neurons(reader, layer, config, rule, source) for layer in range(n_layers)}


def layer_count(width: int, fraction: float) -> int:
    """Neurons in a layer's top `fraction`: rounded, at least one."""
    return max(1, round(width * fraction))


def top_fraction(scores: Mapping[int, torch.Tensor], fraction: float) -> NeuronSets:
    """Per layer, the `fraction` of its neurons with the highest scores (ties: the lower index first)."""
    sets = {}
    for layer, values in scores.items():
        order = torch.sort(values.float(), descending=True, stable=True).indices
        sets[layer] = sorted(order[:layer_count(values.numel(), fraction)].tolist())
    return sets


def random_like(sets: Mapping[int, Sequence[int]], width: int | Mapping[int, int], seed: int) -> NeuronSets:
    """As many neurons per layer as `sets` has, drawn uniformly among the layer's `width` (one for every layer, or
    per layer: an MoE layer has every expert's units) (reproducible from `seed`)."""
    generator = torch.Generator().manual_seed(seed)
    widths = width if isinstance(width, Mapping) else {layer: width for layer in sets}
    return {layer: sorted(torch.randperm(widths[layer], generator=generator)[:len(indexes)].tolist())
            for layer, indexes in sorted(sets.items())}


def jaccard(first: Mapping[int, Sequence[int]], second: Mapping[int, Sequence[int]]) -> float:
    """|A ∩ B| / |A ∪ B| over (layer, neuron) pairs; 1.0 for two empty sets."""
    a = {(layer, index) for layer, indexes in first.items() for index in indexes}
    b = {(layer, index) for layer, indexes in second.items() for index in indexes}
    return len(a & b) / len(a | b) if a | b else 1.0


def count(sets: Mapping[int, Sequence[int]]) -> int:
    return sum(len(indexes) for indexes in sets.values())


def neuron_scores(scores: Mapping[str, torch.Tensor], config: Any) -> dict[int, torch.Tensor]:
    """Per layer, each MLP neuron's score from per-weight scores (`score --save-scores`, or
    `ScoreResult.scores`): the sum over its rows of gate_proj and up_proj (their halves of a fused gate_up_proj),
    the same rows `score --granularity neuron` ranks. Layers without MLP scores are left out."""
    width = int(config.intermediate_size)
    ranked = {}
    for layer in range(int(config.num_hidden_layers)):
        prefix = f"model.layers.{layer}.mlp."
        rows = [scores[prefix + f"{part}.weight"] for part in ("gate_proj", "up_proj") if prefix + f"{part}.weight"
                in scores]
        if prefix + "gate_up_proj.weight" in scores:
            fused = scores[prefix + "gate_up_proj.weight"]
            rows += [fused[:width], fused[width:]]
        if rows:
            ranked[layer] = sum(part.float().sum(1) for part in rows)
    return ranked
