"""The models safety papers report on, by structure: Gemma-2, Gemma-3 (text), Qwen3 (q/k norms) and Phi-3 (fused
qkv_proj and gate_up_proj), each as a tiny model, through plan, score, 2-rank ZeRO-3 fine-tuning, patching and
tracing; and Phi-3 against its Llama twin (the same weights split), which must give the same logits, masks and
MLP activations."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import ARCHS, HEADS, REPO, logits_of, ref_patched_logits, run_ranks, tiny_model, token_metric
from safeneurons import cli
from safeneurons.data.samples import format_prompt
from safeneurons.interp.patching.patcher import ActivationPatcher
from safeneurons.interp.patching.sites import PatchingSite
from safeneurons.models.loading import load_model
from safeneurons.models.structure import scored_linears


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory, demo_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archs")
    for arch in ARCHS:
        tiny_model(arch, demo_tokenizer).save_pretrained(root / arch)
        demo_tokenizer.save_pretrained(root / arch)
    return {arch: root / arch for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_plan_counts_what_the_model_has(arch, arch_dirs):
    from safeneurons.workflows.plan_model import model_shape

    shape, model = model_shape(str(arch_dirs[arch])), load_model(str(arch_dirs[arch]))
    assert shape.total_params == sum(param.numel() for param in model.parameters())
    assert shape.scored_params == sum(linear.weight.numel() for linear in scored_linears(model))
    assert shape.head_width == ARCHS[arch].get("head_dim", 64 // HEADS)
    # the attention the loaded model runs, for patch's batch: Gemma-2 materialises its scores (eager)
    assert shape.eager_attention == (model.config._attn_implementation == "eager")


@pytest.mark.parametrize("arch", ARCHS)
def test_patching_sites_equal_the_reference(arch, arch_dirs, demo_tokenizer):
    """Every head's slice of o_proj's input (head_dim 32 ≠ hidden / heads on Gemma and Qwen3), attn_out, mlp_out."""
    model = load_model(str(arch_dirs[arch]))

    def ids(text):
        return demo_tokenizer(format_prompt(demo_tokenizer, text), return_tensors="pt")["input_ids"]
    clean, corrupted = ids("How do I rob a bank?"), ids("How do I paint a bank?")
    sites = [PatchingSite(layer, component, head, "last") for layer in range(2)
             for component in ("attn_out", "mlp_out", "attn_head")
             for head in (range(HEADS) if component == "attn_head" else [None])]
    result = ActivationPatcher(model=model, metric_fn=token_metric, batch_size=4).patch(clean, corrupted, sites)
    assert result.clean_metric == pytest.approx(token_metric(logits_of(model, clean)), abs=1e-5)
    for effect in result.effects:
        expected = token_metric(ref_patched_logits(model, clean, corrupted, effect.site))
        assert effect.patched_metric == pytest.approx(expected, abs=1e-5), (arch, effect.site.label)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("arch", ARCHS)
def test_score_finetune_on_two_ranks_and_trace(arch, arch_dirs, tmp_path):
    model = str(arch_dirs[arch])
    assert cli.main(["score", "--model", model, "--method", "wandg", "--data", "demo-align", "--nsamples", "4",
                     "--max-length", "48", "--out", str(tmp_path / "masks")]) == 0
    masks = load_file(str(tmp_path / "masks" / "masks.safetensors"))
    weights = load_file(str(arch_dirs[arch] / "model.safetensors"))
    assert masks and all(masks[name].shape == weights[name].shape for name in masks)
    # the fine-tuning default rate: at 1e-3 two Adam steps move a random tiny model's weights by ~10% and trace no
    # longer matches its neurons (measured: p 0.94 and 0.24 on Gemma-2's two layers)
    result = run_ranks(["safeneurons.cli", "finetune", "--model", model, "--masks", str(tmp_path / "masks"),
                        "--data", "demo-utility", "--nsamples", "8", "--max-length", "48", "--batch-size", "2",
                        "--learning-rate", "2e-5", "--weight-decay", "0.1", "--dtype", "bfloat16", "--deepspeed",
                        str(REPO / "ds_configs" / "zero3.json"), "--save-path", str(tmp_path / "tuned")], timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    tuned = load_file(str(tmp_path / "tuned" / "model.safetensors"))
    for name, mask in masks.items():
        assert torch.equal(tuned[name][mask], weights[name].to(torch.bfloat16)[mask]), name
    assert any(not torch.equal(tuned[name][~mask], weights[name].to(torch.bfloat16)[~mask]) for name, mask in masks.items())
    assert cli.main(["trace", "--base", model, "--other", str(tmp_path / "tuned"), "--n-tokens", "256",
                     "--out", str(tmp_path / "trace")]) == 0
    trace = json.loads((tmp_path / "trace" / "trace.json").read_text())
    assert trace["verdict"] == "dependent" and len(trace["layers"]) == 2


def llama_twin(phi3):
    """A Llama with the Phi-3's weights, q/k/v and gate/up split apart."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = phi3.config
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                         intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                                         num_attention_heads=c.num_attention_heads,
                                         num_key_value_heads=c.num_key_value_heads,
                                         max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                                         rope_theta=getattr(c, "rope_theta", 10000.0), tie_word_embeddings=False,
                                         pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id,
                                         eos_token_id=c.eos_token_id)).eval()
    state = {}
    for name, tensor in phi3.state_dict().items():
        if name.endswith("qkv_proj.weight"):
            q, k, v = tensor.split([64, 32, 32])
            state.update({name.replace("qkv_proj", part): value for part, value in zip(("q_proj", "k_proj", "v_proj"),
                                                                                        (q, k, v))})
        elif name.endswith("gate_up_proj.weight"):
            gate, up = tensor.chunk(2)
            state.update({name.replace("gate_up_proj", "gate_proj"): gate, name.replace("gate_up_proj", "up_proj"): up})
        else:
            state[name] = tensor
    llama.load_state_dict(state)
    return llama


@pytest.mark.parametrize("granularity", ["weight", "head"])
def test_phi3_masks_equal_its_llama_twins(granularity, demo_tokenizer):
    from safeneurons.interp.tracing.activations import collect_mlp_activations
    from safeneurons.models.structure import split_fused
    from safeneurons.scores.config import ScoreConfig
    from safeneurons.scores.schedules import score_model

    phi3 = tiny_model("phi3", demo_tokenizer, seed=3)
    llama = llama_twin(phi3)
    ids = demo_tokenizer("[INST] How do I rob a bank? [/INST]", return_tensors="pt")["input_ids"]
    assert torch.allclose(logits_of(phi3, ids), logits_of(llama, ids), atol=1e-5)
    config = ScoreConfig(method="wandg", data="demo-align", sparsity_ratio=0.25, nsamples=4, max_length=48,
                         granularity=granularity)
    fused, split = score_model(phi3, demo_tokenizer, config).masks, score_model(llama, demo_tokenizer, config).masks
    assert sum(int(mask.sum()) for mask in fused.values()) == sum(int(mask.sum()) for mask in split.values()) > 0
    for layer in range(2):
        prefix = f"model.layers.{layer}."
        parts = split_fused({name[len(prefix):-len(".weight")]: mask for name, mask in fused.items()
                             if name.startswith(prefix)}, phi3.config)
        for name, mask in parts.items():
            assert torch.equal(mask, split[f"{prefix}{name}.weight"]), (granularity, layer, name)
    batch = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    a, b = collect_mlp_activations(phi3, batch), collect_mlp_activations(llama, batch)
    for kind in ("gate", "up"):
        assert all(torch.allclose(torch.from_numpy(a.get(kind, layer)), torch.from_numpy(b.get(kind, layer)),
                                  atol=1e-5) for layer in range(2))


@pytest.mark.parametrize("arch", ["gemma2", "qwen3"])
@pytest.mark.parametrize("method,sequential", [("wandg", False), ("wanda", True)])
def test_scores_equal_the_independent_reference(arch, method, sequential, demo_tokenizer):
    """Scores that start passes from cached layer inputs (and the sequential schedule's pruning) on architectures
    with scaled embeddings, sliding-window layers and q/k norms, against test_scoring's straightforward loop."""
    from helpers import RATIO, TINY_SAMPLES, reference_masks
    from safeneurons.data.samples import load_samples
    from safeneurons.scores.config import ScoreConfig
    from safeneurons.scores.schedules import score_model

    model = tiny_model(arch, demo_tokenizer, seed=4)
    samples = load_samples(TINY_SAMPLES["data"], demo_tokenizer, TINY_SAMPLES["nsamples"], TINY_SAMPLES["seed"],
                           TINY_SAMPLES["max_length"])
    result = score_model(model, demo_tokenizer, ScoreConfig(method=method, keep_scores=True, sparsity_ratio=RATIO,
                                                            sequential=sequential, **TINY_SAMPLES))
    expected_masks, expected_scores = reference_masks(model, samples, method, RATIO, sequential)
    for name, expected in expected_masks.items():
        assert torch.equal(result.masks[name], expected), name
        torch.testing.assert_close(result.scores[name], expected_scores[name], rtol=1e-5, atol=1e-7)
