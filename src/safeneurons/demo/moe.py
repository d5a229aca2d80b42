"""The built-in mixture-of-experts demo pair: `demo-moe-base` and `demo-moe` (= `demo-moe-chat`), made exactly as
the dense pair (the same tokenizer, data, pretraining and safety alignment, demo.build) on a Mixtral-architecture
model whose MLPs are 4 routed experts, 2 per token, each half as wide as the dense demo's MLP: the same active MLP
width. Training adds Mixtral's load-balancing loss (`output_router_logits`, coefficient 0.02), as MoE training
does, so that the router spreads tokens over the experts; the saved configs turn it off (it is the build's, and
transformers' generation fails with it on padded batches).

`python -m safeneurons.demo build-moe --out DIR` rebuilds both (DIR/chat, DIR/base) bit for bit; the package ships
the result in `demo/assets/moe_chat` and `demo/assets/moe_base`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safeneurons.demo.build import DemoBuild, DemoPair, build_demo


@dataclass(frozen=True)
class MoeDemoBuild(DemoBuild):
    """The dense demo's build plus its experts."""

    num_experts: int = 4
    experts_per_token: int = 2
    expert_intermediate_size: int = 192  # 2 × 192 = the dense demo's 384 active MLP units
    router_aux_loss_coef: float = 0.02

    base_name = "demo-moe-base"
    chat_name = "demo-moe-chat"


def make_mixtral(build: MoeDemoBuild, tokenizer: Any) -> Any:
    """A randomly initialised Mixtral over `tokenizer`'s vocabulary, its experts run by transformers' eager loop
    (deterministic, so that the build repeats bit for bit)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=build.hidden_size,
                           intermediate_size=build.expert_intermediate_size, num_hidden_layers=build.num_layers,
                           num_attention_heads=build.num_heads, num_key_value_heads=build.num_heads,
                           num_local_experts=build.num_experts, num_experts_per_tok=build.experts_per_token,
                           output_router_logits=True, router_aux_loss_coef=build.router_aux_loss_coef,
                           max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, sliding_window=None)
    config._experts_implementation = "eager"
    torch.manual_seed(build.seed)
    return MixtralForCausalLM(config)


def build_demo_moe(out: str | Path, build: MoeDemoBuild = MoeDemoBuild()) -> DemoPair:
    """demo-moe-base and demo-moe-chat as HF folders out/base and out/chat."""
    return build_demo(out, build, make_mixtral)
