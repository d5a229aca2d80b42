"""The decoder structure safeneurons works on, checked by structure rather than model type: the
layers, their projections (separate or fused), head widths and the Linears that are scored.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import torch
from torch import nn

from safeneurons.errors import SafeneuronsError
from safeneurons.runtime.zero3 import full_shape
from safeneurons.models.moe import (EXPECTED_MOE_LAYOUT, EXPERT_MATRICES, SHARED_GATE_ATTRIBUTE, ExpertBank,
                                   moe_block, moe_blocks)

# Support is decided by structure, not by model type: decoder layers at `model.layers`, each with an attention
# block (separate q/k/v projections or one fused qkv_proj, and o_proj) and an MLP (gate and up projections or one
# fused gate_up_proj, and down_proj). Llama, Mistral, Qwen2/3, Gemma-2/3 and Phi-3 have it; mixtures of experts
# (Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS) have an MoE block in place of the MLP in some or all layers (models.moe).
ATTENTION_LAYOUTS = (("q_proj", "k_proj", "v_proj"), ("qkv_proj",))
MLP_LAYOUTS = (("gate_proj", "up_proj"), ("gate_up_proj",))
BLOCK_OUTPUTS = {"self_attn": "o_proj", "mlp": "down_proj"}
EXPECTED_LAYOUT = ("decoder layers at model.layers with self_attn.{q,k,v}_proj (or qkv_proj) and o_proj, and "
                   "mlp.{gate,up}_proj (or gate_up_proj) and down_proj")


def forward_row_bytes(hidden: int, intermediate: int, heads: int, length: int, element: int,
                      eager_attention: bool) -> int:
    """Peak bytes one sequence of `length` tokens adds to a no-grad forward without KV cache, measured on
    transformers' Llama (tests/workflows/test_plan.py): the MLP's working set, 4h + 3I elements per token (the residual, the
    normed input, the activated gate, up and their product), or — with eager attention, which materialises the
    scores — ≈ 6h elements plus 3 elements and an fp32 softmax value per head and key (the scores, their scaled and
    masked copies); SDPA keeps no scores. `patch` sizes its batches with it and `plan` counts with it."""
    mlp = element * (4 * hidden + 3 * intermediate)
    attention = element * 6 * hidden + (heads * length * (3 * element + 4) if eager_attention else 0)
    return length * max(mlp, attention)


def check_architecture_config(config: Any, name: str = "") -> None:
    """Refuse, before any weight is read, a config whose model lacks the decoder structure (checked on the model
    built on the meta device)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as error:
        raise SafeneuronsError(f"model {name or '?'} (architecture {getattr(config, 'model_type', None)!r}) is not a "
                               f"causal LM transformers can build ({str(error).splitlines()[0]})") from None
    check_architecture(skeleton, name)


def mlp_widths(config: Any) -> dict[int, int]:
    """Per decoder layer, its MLP units as `mlp_neuron` numbers them: a dense MLP's intermediate size, an MoE layer's
    every routed expert's (experts × their width); from the config alone (the model built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    widths = {}
    for index, layer in enumerate(decoder_layers(skeleton)):
        block = moe_block(layer, config)
        widths[index] = (block.num_experts * block.experts.intermediate if block is not None
                         else layer.mlp.down_proj.in_features)
    return widths


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks (`model.model.layers`)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise SafeneuronsError(f"{type(model).__name__} has no decoder layers at model.layers; expected "
                               f"{EXPECTED_LAYOUT}")
    return layers


def _projections(parent: nn.Module | None, prefix: str, layouts: tuple[tuple[str, ...], ...],
                 output: str) -> list[tuple[str, nn.Linear]] | None:
    """`parent`'s input projections (one of `layouts`) and its output projection, named `prefix`.name."""
    names = next((layout for layout in layouts
                  if all(isinstance(getattr(parent, name, None), nn.Linear) for name in layout)), None)
    if names is None or not isinstance(getattr(parent, output, None), nn.Linear):
        return None
    return [(f"{prefix}.{name}", getattr(parent, name)) for name in (*names, output)]


def layer_projections(layer: nn.Module, config: Any = None) -> list[ScoredLinear] | None:
    """The scored matrices of one decoder layer in data order — attention's projections, then the dense MLP's or
    the MoE block's (router, the routed experts' fused 3-D matrices, the shared experts' Linears and their gate) —
    with layer index −1 and no parameter name yet; None when the layer does not have the structure."""
    attention = _projections(getattr(layer, "self_attn", None), "self_attn", ATTENTION_LAYOUTS,
                             BLOCK_OUTPUTS["self_attn"])
    if attention is None:
        return None
    found = [ScoredLinear(-1, name, "", module, config) for name, module in attention]
    mlp = getattr(layer, "mlp", None)
    dense = _projections(mlp, "mlp", MLP_LAYOUTS, BLOCK_OUTPUTS["mlp"])
    if dense is not None:
        return found + [ScoredLinear(-1, name, "", module, config) for name, module in dense]
    block = moe_block(layer, config)
    if block is None:
        return None
    found.append(ScoredLinear(-1, block.router_name, "", block.router, config, routes=True))
    found += [ScoredLinear(-1, f"mlp.experts.{which}_proj", "", block.experts.module, config, f"{which}_proj",
                           block.experts) for which in EXPERT_MATRICES]
    if block.shared is not None:
        shared = _projections(block.shared, block.shared_name, MLP_LAYOUTS, BLOCK_OUTPUTS["mlp"])
        if shared is None:
            return None
        found += [ScoredLinear(-1, name, "", module, config) for name, module in shared]
    if block.shared_gate is not None:
        found.append(ScoredLinear(-1, f"mlp.{SHARED_GATE_ATTRIBUTE}", "", block.shared_gate, config, routes=True))
    return found


def check_architecture(model: nn.Module, name: str = "") -> None:
    """Every decoder layer must have the projections we score, freeze and patch (dense or MoE)."""
    config = getattr(model, "config", None)
    for index, layer in enumerate(decoder_layers(model)):
        if layer_projections(layer, config) is None:
            family = getattr(config, "model_type", None)
            raise SafeneuronsError(f"model {name or type(model).__name__} (family {family!r}): layer {index} does not "
                                   f"have the structure safeneurons works on; expected {EXPECTED_LAYOUT}, or for "
                                   f"a mixture of experts {EXPECTED_MOE_LAYOUT}")


def head_dim(config: Any) -> int:
    """The attention head width as the model uses it: the config's head_dim when set, else hidden / heads."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def fused_parts(name: str, config: Any) -> dict[str, slice] | None:
    """The output rows of each part of a fused projection ("self_attn.qkv_proj": q, k, v; "mlp.gate_up_proj": gate,
    up), None for a projection that is not fused."""
    if name == "mlp.gate_up_proj":  # (the experts' fused matrices are models.moe's)
        width = int(config.intermediate_size)
        return {"gate": slice(0, width), "up": slice(width, 2 * width)}
    if name == "self_attn.qkv_proj":
        heads = int(config.num_attention_heads)
        kv_width = int(getattr(config, "num_key_value_heads", None) or heads) * head_dim(config)
        q_width = heads * head_dim(config)
        return {"q": slice(0, q_width), "k": slice(q_width, q_width + kv_width),
                "v": slice(q_width + kv_width, q_width + 2 * kv_width)}
    return None


SPLIT_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "gate": "mlp.gate_proj",
               "up": "mlp.up_proj"}


def split_fused(tensors: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """One layer's tensors by short name with fused projections replaced by views of their parts, named like the
    separate projections ("self_attn.q_proj", ...): code written for q/k/v and gate/up works on both layouts, and
    writes into the views land in the fused tensors."""
    split = {}
    for name, tensor in tensors.items():
        parts = fused_parts(name, config)
        split.update({SPLIT_NAMES[part]: tensor[rows] for part, rows in parts.items()} if parts else {name: tensor})
    return split


@dataclass(frozen=True)
class ScoredLinear:
    """One scored matrix inside a decoder layer, the unit of scoring, masking and freezing: a Linear's weight, a
    router's weight (scored as a Linear), or one fused 3-D matrix of the routed experts (E Linears side by side)."""

    layer: int
    name: str  # e.g. "self_attn.q_proj", "mlp.gate", "mlp.experts.gate_up_proj"
    param_name: str  # full parameter name, e.g. "model.layers.3.self_attn.q_proj.weight"
    module: nn.Module  # the Linear, the router or the experts module
    config: Any = field(default=None, compare=False, repr=False)  # the model's config (sizes of fused parts)
    attribute: str = "weight"  # the parameter's name on `module`
    experts: ExpertBank | None = field(default=None, compare=False, repr=False)  # set for the experts' matrices
    routes: bool = False  # a router or a shared expert's gate: it decides how much of an expert a token gets

    @property
    def linear_shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the Linear it is, or of each expert's."""
        shape = full_shape(self.weight)
        if self.experts is None:
            return shape
        return (shape[2], shape[1]) if self.experts.transposed else (shape[1], shape[2])

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.module, self.attribute)

    @property
    def expert_matrix(self) -> str | None:
        """"gate_up" or "down" for a matrix of the routed experts, else None."""
        return None if self.experts is None else self.attribute.removesuffix("_proj")


def scored_linears(model: nn.Module, layer: int | None = None) -> list[ScoredLinear]:
    """The matrices we score, in layer order (one layer if `layer` is given); never embeddings, norms, biases,
    lm_head."""
    check_architecture(model)
    names = {id(module): name for name, module in model.named_modules()}
    config = getattr(model, "config", None)
    found = []
    for index, block in enumerate(decoder_layers(model)):
        if layer is not None and index != layer:
            continue
        found += [replace(item, layer=index, param_name=f"{names[id(item.module)]}.{item.attribute}")
                  for item in layer_projections(block, config)]
    return found


def transposed_experts(model: nn.Module) -> set[str]:
    """The parameter names of the experts' matrices stored transposed, [E, in, out] (GPT-OSS): what an edit by name
    needs to find each expert's output rows."""
    config = getattr(model, "config", None)
    names = {id(param): name for name, param in model.named_parameters()}
    return {names[id(block.experts.matrix(which))] for block in moe_blocks(decoder_layers(model), config).values()
            if block.experts.transposed for which in EXPERT_MATRICES}


@contextlib.contextmanager
def layers_from(model: nn.Module, start: int, stop: int | None = None) -> Iterator[None]:
    """While active, the model's forward runs decoder layers [start, stop) only, from `inputs_embeds` = the
    hidden states entering layer `start` (rotary positions and the causal mask are rebuilt as usual)."""
    if start == 0 and stop is None:
        yield
        return
    inner = model.model
    every = inner.layers
    inner.layers = nn.ModuleList(list(every)[start:stop])
    try:
        yield
    finally:
        inner.layers = every


def model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first parameter (its weights' dtype: the loaders load one dtype)."""
    for param in model.parameters():
        return param.dtype
    return torch.float32


# What two models must share for one's activations to stand in for the other's (cross-model patching).
SHAPE_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size")


def check_same_config(config: Any, other: Any, names: tuple[str, str] = ("the model", "the source model")) -> None:
    """Refuse (from the configs alone, before any weight loads) two models whose activations do not match."""
    for field_name in SHAPE_FIELDS:
        first, second = getattr(config, field_name, None), getattr(other, field_name, None)
        if first != second:
            raise SafeneuronsError(f"{names[0]} and {names[1]} differ in structure: {field_name} {first!r} vs "
                                   f"{second!r}; activations are exchanged only between models of one structure")


def check_same_structure(model: nn.Module, other: nn.Module) -> None:
    check_same_config(model.config, other.config)


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
        f"activation matching and patching need both models to read the same token ids")
