"""Mixtures of experts by structure (models.moe): what each family's MoE block is made of, our routed forward
against transformers' own eager forward, and the layouts refused in one line."""
from __future__ import annotations

import pytest
import torch

from helpers import MOE_FAMILIES, tiny_moe
from safeneurons.errors import SafeneuronsError
from safeneurons.models.moe import moe_block
from safeneurons.models.structure import check_architecture_config, scored_linears


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_family_is_read_by_structure(family, demo_tokenizer):
    model = tiny_moe(family, demo_tokenizer)
    names = {(linear.layer, linear.name): linear for linear in scored_linears(model)}
    router = "mlp.router" if family == "gpt_oss" else "mlp.gate"
    dense_first = family == "qwen3_moe"  # mlp_only_layers=[0]: a dense MLP below an MoE layer
    assert ((0, "mlp.gate_proj") in names) == dense_first
    assert ((0, router) in names) != dense_first
    experts = names[(1, "mlp.experts.gate_up_proj")]
    assert experts.weight.dim() == 3 and experts.weight is model.model.layers[1].mlp.experts.gate_up_proj
    assert experts.experts.transposed == (family == "gpt_oss") and experts.experts.interleaved == (family == "gpt_oss")
    assert names[(1, router)].weight.shape == (4, 32)
    assert ((1, "mlp.shared_expert.down_proj") in names) == ((1, "mlp.shared_expert_gate") in names) == (
        family == "qwen2_moe")
    # every scored matrix is a parameter of the model, named as the model names it, and no bias is scored
    parameters = dict(model.named_parameters())
    assert all(parameters[linear.param_name] is linear.weight for linear in names.values())
    assert not any("bias" in linear.param_name for linear in names.values())


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_routed_forward_equals_the_family_eager_forward(family, demo_tokenizer):
    model = tiny_moe(family, demo_tokenizer)
    block = moe_block(model.model.layers[1], model.config)
    hidden = torch.randn(2, 7, 32)
    with torch.no_grad():
        expected = block.module(hidden)
        seen = []
        with block.experts.observed(lambda expert, tokens, *_: seen.append((expert, tokens.numel()))):
            ours = block.module(hidden)
    expected, ours = (out[0] if isinstance(out, tuple) else out for out in (expected, ours))
    assert torch.equal(ours, expected)
    assert sum(count for _, count in seen) == 2 * 7 * 2  # every token reached its top-2 experts
    assert block.experts.module.forward.__func__ is type(block.experts.module).forward  # restored


def test_an_edited_expert_output_changes_only_its_tokens(demo_tokenizer):
    model = tiny_moe("mixtral", demo_tokenizer)
    block = moe_block(model.model.layers[0], model.config)
    hidden = torch.randn(1, 9, 32)
    routed_to_two = []

    def zero_expert_two(expert, tokens, inputs, gate_up, inner, out):
        if expert == 2:
            routed_to_two.extend(tokens.tolist())
            return torch.zeros_like(out)
        return None
    with torch.no_grad():
        plain = block.module(hidden)
        with block.experts.observed(zero_expert_two):
            edited = block.module(hidden)
    changed = (plain != edited).any(dim=-1).flatten().nonzero().flatten().tolist()
    assert changed == sorted(routed_to_two)


def test_multi_head_latent_attention_is_refused_in_one_line(demo_tokenizer):
    from transformers import DeepseekV2Config

    config = DeepseekV2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=24, moe_intermediate_size=16, n_routed_experts=4,
                              num_experts_per_tok=2, eos_token_id=1, bos_token_id=0, pad_token_id=2)
    with pytest.raises(SafeneuronsError) as error:
        check_architecture_config(config, "tiny-deepseek")
    message = str(error.value)
    assert "\n" not in message and "'deepseek_v2'" in message and "self_attn.{q,k,v}_proj" in message


def test_demo_moe_build_is_deterministic_and_ships_as_named(tmp_path):
    from safetensors import safe_open

    from safeneurons.demo.moe import MoeDemoBuild, build_demo_moe
    from safeneurons.models.loading import load_config, resolve_model_name

    build = MoeDemoBuild(steps=3, chat_steps=2, batch_size=4)
    first, second = build_demo_moe(tmp_path / "a", build), build_demo_moe(tmp_path / "b", build)
    for kind in ("chat", "base"):
        weights = [getattr(pair, kind) / "model.safetensors" for pair in (first, second)]
        assert weights[0].read_bytes() == weights[1].read_bytes(), kind
    with safe_open(str(first.chat / "model.safetensors"), "pt") as handle:  # experts fused, as the model names them
        assert "model.layers.0.mlp.experts.gate_up_proj" in handle.keys()
    shipped = load_config("demo-moe")
    assert (shipped.model_type, shipped.num_local_experts, shipped.num_experts_per_tok) == ("mixtral", 4, 2)
    assert shipped.output_router_logits is False  # generation on padded batches fails with it on
    assert resolve_model_name("demo-moe") == resolve_model_name("demo-moe-chat") != resolve_model_name("demo-moe-base")


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_plan_counts_total_and_active_parameters(family, demo_tokenizer, tmp_path):
    from safeneurons.workflows.plan import Cluster, Workload, format_table, plan_report
    from safeneurons.workflows.plan_model import model_shape

    model = tiny_moe(family, demo_tokenizer)
    model.save_pretrained(tmp_path, save_original_format=False)
    shape = model_shape(str(tmp_path))
    routed = sum(param.numel() for name, param in model.named_parameters() if ".mlp.experts." in name)
    total = sum(param.numel() for param in model.parameters())
    assert shape.total_params == total
    assert shape.active_params == total - routed // 2  # top-2 of 4 experts: half of the routed experts unused
    # a token's MLP units: 2 experts of 24, plus Qwen2-MoE's shared expert of 40
    assert shape.intermediate == 2 * 24 + (40 if family == "qwen2_moe" else 0)
    assert shape.experts.largest_matrix == 4 * 48 * 32
    text = format_table(plan_report(shape, Cluster(1, 8), Workload()))
    assert f"({shape.active_params / 1e9:.2f}B active: 2 of 4 experts)" in text.splitlines()[0]
