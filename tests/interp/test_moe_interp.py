"""Interpretability on mixtures of experts: weight orthogonalization of every expert's down_proj (and the shared
expert's, and GPT-OSS's expert biases) against the directional-ablation hooks."""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import tiny_moe
from safeneurons.interp.direction import hooks
from safeneurons.interp.direction.candidates import encode, last_logits
from safeneurons.interventions.orthogonalize import orthogonalize_files, orthogonalize_model

PROMPTS = ["[INST] How do I rob a bank? [/INST]", "[INST] Hi [/INST]"]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_orthogonalized_experts_equal_the_ablation_hooks(family, demo_tokenizer, tmp_path):
    model = tiny_moe(family, demo_tokenizer, seed=2)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(2))
    inputs = encode(demo_tokenizer, PROMPTS, torch.device("cpu"))
    with hooks.ablation(model, direction):
        ablated = last_logits(model, inputs)
    assert not torch.allclose(ablated, last_logits(model, inputs), atol=1e-3)
    edited = copy.deepcopy(model)
    result = orthogonalize_model(edited, direction)
    expected = {f"model.layers.{layer}.mlp.experts.down_proj" for layer in range(2)}
    if family == "gpt_oss":
        expected |= {name + "_bias" for name in expected}
    if family == "qwen2_moe":
        expected |= {f"model.layers.{layer}.mlp.shared_expert.down_proj.weight" for layer in range(2)}
    assert expected <= set(result.edited)
    torch.testing.assert_close(last_logits(edited, inputs), ablated, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "out").mkdir()
    streamed = orthogonalize_files(tmp_path / "model", direction, tmp_path / "out")
    assert sorted(streamed.edited) == sorted(result.edited)
    loaded = type(model).from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(last_logits(loaded, inputs), ablated, atol=1e-5, rtol=1e-5)
