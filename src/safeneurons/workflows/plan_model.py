"""The sizes `plan` counts with (ModelShape): built-in Llama-2 sizes, or a model folder's config and the parameter
counts of its meta skeleton — for a mixture of experts also its active parameters and MLP width (MoeShape)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safeneurons.errors import SafeneuronsError


@dataclass(frozen=True)
class MoeShape:
    """What `plan` needs of a mixture of experts, counted on its skeleton (models.moe)."""

    num_experts: int  # routed experts per MoE layer
    top_k: int  # chosen per token
    routed_params: int  # all routed experts' parameters (every MoE layer)
    largest_matrix: int  # elements of the largest fused experts' matrix: the smallest round of wandg's sums
    units: int  # every routed expert's intermediate units in a layer (what lineage matches together)


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False
    head_dim: int | None = None  # the config's head_dim when it sets one (Gemma, Qwen3, Mistral-NeMo), else hidden/heads
    counted: tuple[int, int, int] | None = None  # (total, scored, largest) counted on the model's meta skeleton
    eager_attention: bool = False  # the model's attention materialises its scores (Gemma-2's default), not SDPA
    experts: MoeShape | None = None  # a mixture of experts (then `intermediate` is the active MLP width per token)

    @property
    def active_params(self) -> int:
        """Parameters one token runs through: all but the routed experts it does not choose."""
        if self.experts is None:
            return self.total_params
        moe = self.experts
        return self.total_params - moe.routed_params * (moe.num_experts - moe.top_k) // moe.num_experts

    @property
    def head_width(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_width

    @property
    def scored_params_per_layer(self) -> int:
        """q, k, v, o, gate, up, down: the Linear weights that are scored, masked and frozen."""
        if self.counted is not None:
            return self.counted[1] // self.layers
        query = self.heads * self.head_width
        attention = 2 * self.hidden * query + 2 * self.hidden * self.kv_dim
        return attention + 3 * self.hidden * self.intermediate

    @property
    def scored_params(self) -> int:
        return self.layers * self.scored_params_per_layer

    @property
    def total_params(self) -> int:
        if self.counted is not None:
            return self.counted[0]
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        norms = (2 * self.layers + 1) * self.hidden
        return self.scored_params + embeddings + norms

    @property
    def largest_param(self) -> int:
        """The largest single tensor, the most ZeRO-3 gathers at once (DeepSpeed's `largest_layer_params`)."""
        if self.counted is not None:
            return self.counted[2]
        return max(self.vocab * self.hidden, self.hidden * self.intermediate)


PRESETS = {
    "llama2-7b": ModelShape("llama2-7b", 4096, 32, 11008, 32, 32, 32000),
    "llama2-13b": ModelShape("llama2-13b", 5120, 40, 13824, 40, 40, 32000),
    "llama2-70b": ModelShape("llama2-70b", 8192, 80, 28672, 64, 8, 32000),
}
PRESET_ALIASES = {f"{size}{suffix}": f"llama2-{size.split('-')[1]}"
                  for size in ("llama2-7b", "llama2-13b", "llama2-70b") for suffix in ("", "-hf", "-chat-hf")}
PRESET_ALIASES.update({f"meta-llama/Llama-2-{size}{chat}-hf": f"llama2-{size}"
                       for size in ("7b", "13b", "70b") for chat in ("", "-chat")})


def model_shape(name: str) -> ModelShape:
    """The built-in size of a llama2 alias, or the shape of a local model folder (or `demo`): its config's sizes,
    and the parameter counts of the model transformers builds from it on the meta device (so every architecture's
    own extras — norms, biases, fused projections, head_dim — are counted as the model has them). A model that
    lacks the decoder structure is refused as by every other stage."""
    if name in PRESET_ALIASES:
        return PRESETS[PRESET_ALIASES[name]]
    from safeneurons.models.loading import model_skeleton, resolve_model_name
    from safeneurons.models.structure import scored_linears

    folder = Path(resolve_model_name(name))
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise SafeneuronsError(f"model {name!r} is neither a known size ({', '.join(PRESETS)}) nor a local folder "
                               f"with a config.json; pass --model DIR with the model's config.json")
    config = json.loads(config_file.read_text())
    try:
        heads = config["num_attention_heads"]
        sizes = (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"], heads,
                 config.get("num_key_value_heads") or heads, config["vocab_size"])
    except KeyError as missing:
        raise SafeneuronsError(f"{config_file} has no {missing.args[0]}; expected a decoder LM config") from None
    skeleton = model_skeleton(name)  # checks the structure
    parameters = list(skeleton.parameters())
    counted = (sum(param.numel() for param in parameters),
               sum(linear.weight.numel() for linear in scored_linears(skeleton)),
               max(param.numel() for param in parameters))
    experts = moe_shape(skeleton)
    if experts is not None:  # the activations of one token: its chosen experts' and the shared experts' units
        sizes = (*sizes[:2], active_mlp_width(skeleton), *sizes[3:])
    return ModelShape(name, *sizes, bool(getattr(skeleton.config, "tie_word_embeddings", False)),
                      config.get("head_dim"), counted, skeleton.config._attn_implementation == "eager", experts)


def moe_shape(skeleton: Any) -> MoeShape | None:
    from safeneurons.models.moe import moe_blocks
    from safeneurons.models.structure import decoder_layers

    blocks = list(moe_blocks(decoder_layers(skeleton), skeleton.config).values())
    if not blocks:
        return None
    matrices = [block.experts.matrix(which) for block in blocks for which in ("gate_up", "down")]
    biases = [bias for block in blocks for which in ("gate_up", "down")
              if (bias := block.experts.bias(which)) is not None]
    return MoeShape(blocks[0].num_experts, blocks[0].top_k, sum(param.numel() for param in matrices + biases),
                    max(param.numel() for param in matrices),
                    max(block.num_experts * block.experts.intermediate for block in blocks))


def active_mlp_width(skeleton: Any) -> int:
    """The MLP units one token runs through in the widest layer: top-k experts' plus the shared experts', or a dense
    layer's."""
    from safeneurons.models.moe import moe_block
    from safeneurons.models.structure import decoder_layers

    widths = []
    for layer in decoder_layers(skeleton):
        block = moe_block(layer, skeleton.config)
        if block is None:
            widths.append(layer.mlp.down_proj.in_features)
            continue
        shared = block.shared.down_proj.in_features if block.shared is not None else 0
        widths.append(block.top_k * block.experts.intermediate + shared)
    return max(widths)
