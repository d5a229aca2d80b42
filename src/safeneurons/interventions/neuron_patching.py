"""Dynamic neuron patching during generation: the patched model generates; at every forward it makes (the prompt,
then each new token) the source model runs on the same tokens with its own KV cache, and the chosen MLP neurons
of the patched model take the source model's values at those tokens. With the patched model as its own source
nothing changes, token for token."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from safeneurons.errors import SafeneuronsError
from safeneurons.masks.neurons import check_sets
from safeneurons.models.hooks import Hooks, output_width, site_point
from safeneurons.models.structure import check_same_structure, decoder_layers

# layer -> neuron indexes (the input columns of its down_proj; on an MoE layer expert e's unit j is e·intermediate + j)
NeuronSet = Mapping[int, Sequence[int]]


def neuron_index(model: nn.Module, neurons: NeuronSet) -> dict[int, torch.Tensor]:
    """The non-empty layers of `neurons` as index tensors; an error names a layer or neuron that does not exist."""
    layers = decoder_layers(model)
    check_sets(neurons, len(layers), {layer: output_width(site_point(model, layer, "mlp_neuron"))
                                      for layer in range(len(layers))})
    return {layer: torch.as_tensor(sorted(set(int(i) for i in indexes)), dtype=torch.long)
            for layer, indexes in sorted(neurons.items()) if len(indexes)}


FORWARDED = ("input_ids", "attention_mask", "position_ids", "cache_position")


class _SourceRun:
    """The source model's run on the tokens the patched model is about to process, with its own KV cache (a new
    one whenever the patched model starts a sequence)."""

    def __init__(self, source: nn.Module, layers: Sequence[int]) -> None:
        self.source = source
        self.values: dict[int, torch.Tensor] = {}
        self.cache: Any = None
        self.running = False  # the source may be the patched model itself: its own call must not recurse
        self.cache_argument = _cache_argument(source)
        self.hooks = Hooks()
        for layer in layers:
            self.hooks.on_units(source, layer, lambda values, layer=layer: self.values.__setitem__(layer, values))

    def __call__(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        from transformers import DynamicCache

        if self.running:
            return
        past = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5 renamed it `cache`
        if self.cache is None or past is None or past.get_seq_length() == 0:
            self.cache = DynamicCache(config=self.source.config)
        inputs = {name: kwargs[name] for name in FORWARDED if kwargs.get(name) is not None}
        if args:
            inputs["input_ids"] = args[0]
        if "input_ids" not in inputs:
            raise SafeneuronsError("dynamic neuron patching needs token ids (the patched model got embeddings)")
        self.running = True
        try:
            self.source(**inputs, **{self.cache_argument: self.cache}, use_cache=True, logits_to_keep=1)
        finally:
            self.running = False


def _cache_argument(model: nn.Module) -> str:
    """transformers 5 renamed the forward's `past_key_values` to `cache`."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@contextlib.contextmanager
def patched_neurons(model: nn.Module, source: nn.Module, neurons: NeuronSet) -> Iterator[None]:
    """While open, every forward of `model` (a generation step, or a plain call) first runs `source` on the same
    tokens, and the `neurons` of `model` take the source's values at every token of that forward."""
    check_same_structure(model, source)
    chosen = neuron_index(model, neurons)
    run = _SourceRun(source, list(chosen))

    def writer(layer: int, columns: torch.Tensor):
        def write(activation: torch.Tensor) -> torch.Tensor:
            activation = activation.clone()
            activation[..., columns] = run.values[layer][..., columns].to(activation.dtype)
            return activation
        return write

    hooks = Hooks()
    with run.hooks, hooks:
        if chosen:  # an empty set patches nothing and runs no source model
            hooks.on_input(model, run, with_kwargs=True)
        for layer, columns in chosen.items():
            hooks.on_edit(site_point(model, layer, "mlp_neuron"), writer(layer, columns.to(
                next(model.parameters()).device)))
        yield
