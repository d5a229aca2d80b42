"""The post-fine-tuning defences (`defend`): RESTA's arithmetic, Safe LoRA's projection and selection, Antidote's
pruning, each against a reference written here on tiny saved models, each one's off setting bit-identical to the
fine-tuned model, and their bad input one line before any model loads."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import make_tiny_llama, reference_masks, run_expecting_error, weights
from safeneurons import cli
from safeneurons.data.samples import load_samples

LORA_TARGETS = ("self_attn.q_proj", "self_attn.v_proj")


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int32)


@pytest.fixture(scope="module")
def trio(tmp_path_factory, demo_tokenizer):
    """Saved base, aligned (base moved everywhere) and fine-tuned (aligned plus a rank-2 update of every q and v
    projection, as a merged LoRA) tiny Llamas."""
    root = tmp_path_factory.mktemp("defences")
    base = make_tiny_llama(demo_tokenizer, seed=3)
    generator = torch.Generator().manual_seed(4)
    folders = {}
    with torch.no_grad():
        for name in ("base", "aligned", "finetuned"):
            if name == "aligned":
                for param in base.parameters():
                    param.add_(0.05 * torch.randn(param.shape, generator=generator))
            if name == "finetuned":
                for layer in base.model.layers:
                    for target in LORA_TARGETS:
                        weight = layer.get_submodule(target).weight
                        update = torch.randn(weight.shape[0], 2, generator=generator) @ torch.randn(
                            2, weight.shape[1], generator=generator)
                        weight.add_(0.02 * update)
            folders[name] = root / name
            base.save_pretrained(folders[name])
            demo_tokenizer.save_pretrained(folders[name])
    return folders


def defend(method: str, trio, out, *options: str) -> dict:
    command = ["defend", "--defence", method, "--model", str(trio["finetuned"]), "--out", str(out), *options]
    if method != "antidote":
        command += ["--aligned", str(trio["aligned"]), "--base-model", str(trio["base"])]
    assert cli.main(command) == 0
    return weights(out)


def test_resta_adds_the_scaled_safety_vector_and_scale_zero_changes_nothing(trio, tmp_path):
    base, aligned, finetuned = (weights(trio[name]) for name in ("base", "aligned", "finetuned"))
    restored = defend("resta", trio, tmp_path / "resta", "--resta-scale", "0.5")
    assert set(restored) == set(finetuned)
    for name, tensor in finetuned.items():
        expected = tensor + 0.5 * (aligned[name] - base[name])
        torch.testing.assert_close(restored[name], expected, rtol=0, atol=1e-7)
    assert not torch.equal(restored["model.embed_tokens.weight"], finetuned["model.embed_tokens.weight"])
    summary = json.loads((tmp_path / "resta" / "resta_summary.json").read_text())
    norm = torch.cat([(aligned[name] - base[name]).flatten().double() for name in aligned]).norm()
    assert summary["tensors"] == len(finetuned) and summary["safety_vector_norm"] == pytest.approx(float(norm))
    off = defend("resta", trio, tmp_path / "off", "--resta-scale", "0")
    assert all(torch.equal(bits(off[name]), bits(tensor)) for name, tensor in finetuned.items())


def test_resta_dare_drops_and_rescales_the_fine_tuning_delta(trio, tmp_path):
    aligned, finetuned = weights(trio["aligned"]), weights(trio["finetuned"])
    first = defend("resta", trio, tmp_path / "a", "--resta-scale", "0", "--dare-drop", "0.5", "--seed", "1")
    again = defend("resta", trio, tmp_path / "b", "--resta-scale", "0", "--dare-drop", "0.5", "--seed", "1")
    other = defend("resta", trio, tmp_path / "c", "--resta-scale", "0", "--dare-drop", "0.5", "--seed", "2")
    name = "model.layers.0.self_attn.q_proj.weight"
    delta = finetuned[name] - aligned[name]
    dropped = torch.isclose(first[name], aligned[name], rtol=0, atol=1e-7)
    kept = torch.isclose(first[name], aligned[name] + 2 * delta, rtol=0, atol=1e-6)
    assert bool((dropped | kept).all()) and 0.4 < float(dropped.float().mean()) < 0.6
    assert torch.equal(first[name], again[name]) and not torch.equal(first[name], other[name])


def reference_safe_lora(trio) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Each changed matrix's similarity and projected weight, with C formed explicitly as the paper writes it."""
    base, aligned, finetuned = (weights(trio[name]) for name in ("base", "aligned", "finetuned"))
    similarities, projected = {}, {}
    for name, tensor in finetuned.items():
        update = tensor - aligned[name]
        if tensor.dim() != 2 or not update.any():
            continue
        alignment = aligned[name] - base[name]
        projector = alignment @ alignment.T / torch.linalg.matrix_norm(alignment)
        moved = projector @ update
        similarities[name] = float((update * moved).sum() / (update.norm() * moved.norm()))
        projected[name] = aligned[name] + moved
    return similarities, projected


def test_safe_lora_selects_as_the_authors_code_with_ties():
    """One bound, every similarity at or below it: the k-th smallest (ties with it projected too) or τ."""
    from safeneurons.interventions.safe_lora import SafeLoraConfig, select

    similarities = {"a": 0.1, "b": 0.2, "c": 0.2, "d": 0.5}
    by_number = [select(similarities, SafeLoraConfig("f", "a", "b", layers=k)) for k in (0, 1, 2, 3, 9)]
    assert by_number == [[], ["a"], ["a", "b", "c"], ["a", "b", "c"], ["a", "b", "c", "d"]]
    assert select(similarities, SafeLoraConfig("f", "a", "b", selection="threshold", threshold=0.2)) == ["a", "b", "c"]
    assert SafeLoraConfig("f", "a", "b").selection == "number" and SafeLoraConfig("f", "a", "b").layers == 10


def test_safe_lora_projects_the_layers_below_the_threshold(trio, tmp_path):
    similarities, projected = reference_safe_lora(trio)
    assert sorted(similarities) == sorted(f"model.layers.{layer}.{target}.weight" for layer in range(2)
                                          for target in LORA_TARGETS)
    threshold = sum(sorted(similarities.values())[1:3]) / 2  # the two least similar fall below it
    result = defend("safe_lora", trio, tmp_path / "safe", "--safe-lora-selection", "threshold",
                    "--safe-lora-threshold", str(threshold))
    finetuned = weights(trio["finetuned"])
    summary = json.loads((tmp_path / "safe" / "safe_lora_summary.json").read_text())
    chosen = {name for name, value in similarities.items() if value < threshold}
    assert len(chosen) == 2 and set(summary["projected"]) == chosen
    for name, value in similarities.items():
        assert summary["similarities"][name] == pytest.approx(value, abs=1e-5)
    for name, tensor in finetuned.items():
        if name in chosen:
            torch.testing.assert_close(result[name], projected[name], rtol=0, atol=1e-5)
        else:
            assert torch.equal(bits(result[name]), bits(tensor)), name
    least = min(similarities, key=similarities.get)
    defend("safe_lora", trio, tmp_path / "one", "--safe-lora-selection", "number", "--safe-lora-layers", "1")
    assert json.loads((tmp_path / "one" / "safe_lora_summary.json").read_text())["projected"] == [least]
    off = defend("safe_lora", trio, tmp_path / "off", "--safe-lora-layers", "0")
    assert all(torch.equal(bits(off[name]), bits(tensor)) for name, tensor in finetuned.items())


def test_antidote_prunes_the_top_wanda_weights_on_harmful_data(trio, tmp_path, demo_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(trio["finetuned"]).eval()
    samples = load_samples("demo-harmful-sft", demo_tokenizer, 4, 0, 64)
    masks, _ = reference_masks(model, samples, "wanda", 0.25, sequential=False)
    options = ["--harmful-training-data", "demo-harmful-sft", "--nsamples", "4", "--max-length", "64"]
    finetuned = weights(trio["finetuned"])
    assert set(masks) <= set(finetuned)
    for modules, option in ((("q_proj", "k_proj", "v_proj"), []), (None, ["--antidote-modules", "all"])):
        out = tmp_path / f"antidote-{len(option)}"
        pruned = defend("antidote", trio, out, *options, "--antidote-sparsity", "0.25", *option)
        chosen = {name: mask for name, mask in masks.items() if modules is None or name.split(".")[-2] in modules}
        assert len(chosen) == (len(masks) if modules is None else 3 * 2)  # the demo's 2 layers
        for name, tensor in finetuned.items():  # the authors' q, k, v by default, every Linear with 'all'
            expected = tensor.masked_fill(chosen[name], 0) if name in chosen else tensor
            assert torch.equal(bits(pruned[name]), bits(expected)), name
        summary = json.loads((out / "antidote_summary.json").read_text())
        assert summary["pruned"] == sum(int(mask.sum()) for mask in chosen.values())
        assert (out / "antidote_masks" / "masks.safetensors").is_file()
    off = defend("antidote", trio, tmp_path / "off", *options, "--antidote-sparsity", "0")
    assert all(torch.equal(bits(off[name]), bits(tensor)) for name, tensor in finetuned.items())


@pytest.mark.parametrize("case, options, message", [
    ("resta", ["--method", "resta", "--aligned", "{aligned}"], "--defence resta needs --base-model"),
    ("safe_lora", ["--method", "safe_lora", "--aligned", "{aligned}", "--base-model", "{other}"],
     "which --aligned does not"),
    ("resta", ["--method", "resta", "--aligned", "{aligned}", "--base-model", "{other}"], "which --aligned does not"),
    ("safe_lora", ["--method", "safe_lora", "--aligned", "{aligned}", "--base-model", "{base}",
                   "--safe-lora-threshold", "1.5"], "--safe-lora-threshold 1.5 must lie in [0, 1]"),
    ("antidote", ["--method", "antidote"], "--defence antidote needs --harmful-training-data"),
    ("antidote", ["--method", "antidote", "--harmful-training-data", "demo-harmful-sft", "--antidote-sparsity", "1"],
     "--antidote-sparsity 1.0 must lie in [0, 1)"),
    ("antidote", ["--method", "antidote", "--harmful-training-data", "demo-harmful-sft", "--antidote-modules", "q_proj,qkv"],
     "--antidote-modules: qkv is not a Linear of the fine-tuned model (it has down_proj, gate_proj, k_proj, o_proj"),
    ("resta", ["--method", "resta", "--aligned", "{aligned}", "--base-model", "{base}", "--dare-drop", "1"],
     "--dare-drop 1.0 must lie in [0, 1)"),
])
def test_defend_bad_input_is_one_line_before_any_model_loads(trio, tmp_path, demo_tokenizer, capsys, monkeypatch,
                                                             case, options, message):
    from safeneurons.models import loading

    other = tmp_path / "other"
    make_tiny_llama(demo_tokenizer, seed=1, layers=3).save_pretrained(other)
    monkeypatch.setattr(loading, "load_for_inference", lambda *a, **k: pytest.fail("a model was loaded"))
    paths = {"{aligned}": str(trio["aligned"]), "{base}": str(trio["base"]), "{other}": str(other)}
    command = ["defend", "--finetuned", str(trio["finetuned"]), "--out", str(tmp_path / "out"),
               *[paths.get(option, option) for option in options]]
    assert message in run_expecting_error(command, tmp_path, capsys)
    assert not (tmp_path / "out").exists()
