"""wanda and wandg on mixtures of experts against references written here: per-expert wandg from one backward per
sample and Σ |grad| of the fused 3-D parameters; per-expert wanda from the inputs of the tokens routed to each
expert, read off the family's own forward; granularity expert; batch and rank independence; the CLI's files and
its errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from helpers import MOE_FAMILIES, TINY_SAMPLES, make_tiny_llama, run_expecting_error, tiny_moe
from safeneurons import cli
from safeneurons.data.samples import load_samples
from safeneurons.scores.config import ScoreConfig
from safeneurons.scores.schedules import score_model

RATIO = 0.3


@pytest.fixture(scope="module")
def samples(demo_tokenizer):
    return load_samples(TINY_SAMPLES["data"], demo_tokenizer, TINY_SAMPLES["nsamples"], TINY_SAMPLES["seed"],
                        TINY_SAMPLES["max_length"])


def moe_matrices(model) -> dict[str, torch.nn.Parameter]:
    """Every router and experts' matrix, by parameter name (the reference's own walk over the model)."""
    return {name: param for name, param in model.named_parameters()
            if name.endswith(("experts.gate_up_proj", "experts.down_proj", "gate.weight", "router.weight"))}


def reference_wandg(model, samples) -> dict[str, torch.Tensor]:
    """Σ over samples of |∂L_s/∂W| of each router and fused expert parameter: one backward per sample."""
    matrices = moe_matrices(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for param in matrices.values():
        param.requires_grad_(True)
    sums = {name: torch.zeros_like(param) for name, param in matrices.items()}
    for sample in samples:
        model.zero_grad(set_to_none=True)
        model(sample.input_ids[None], labels=sample.labels[None]).loss.backward()
        for name, param in matrices.items():
            for expert in range(param.shape[0]):  # slice by slice: each expert's own gradient
                sums[name][expert] += param.grad[expert].abs()
    for param in model.parameters():
        param.requires_grad_(False)
    return {name: matrices[name].detach().abs() * total for name, total in sums.items()}


def reference_wanda(model, samples) -> dict[str, torch.Tensor]:
    """Per expert: Σ over the response tokens routed to it of x_j², x the input of gate_up_proj (the layer's hidden
    state) and of down_proj (the family's own gate applied to that token's gate_up output); routers: Σ x_j² over
    all response tokens. Scores |W| · sqrt(Σ / n), expert by expert."""
    seen: dict[int, tuple] = {}
    handles = [layer.mlp.experts.register_forward_pre_hook(
        lambda module, args, index=index: seen.__setitem__(index, (module, *args)))
        for index, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    sums: dict[str, torch.Tensor] = {}
    for sample in samples:
        with torch.no_grad():
            model(sample.input_ids[None])
        responses = sample.labels != -100
        for index, (experts, hidden, top_k_index, _) in seen.items():
            prefix = f"model.layers.{index}.mlp"
            router = "router" if hasattr(model.model.layers[index].mlp, "router") else "gate"
            hidden = hidden.reshape(-1, hidden.shape[-1])
            sums[f"{prefix}.{router}.weight"] = sums.get(f"{prefix}.{router}.weight", 0) + hidden[responses].pow(2).sum(0)
            for expert in range(experts.num_experts):
                rows = (top_k_index == expert).any(dim=-1) & responses
                x = hidden[rows]
                w = experts.gate_up_proj[expert]
                gate_up = x @ w + experts.gate_up_proj_bias[expert] if experts.is_transposed else F.linear(x, w)
                inner = experts._apply_gate(gate_up)
                for name, inputs in (("gate_up_proj", x), ("down_proj", inner)):
                    key = f"{prefix}.experts.{name}"
                    sums.setdefault(key, torch.zeros(experts.num_experts, inputs.shape[-1]))[expert] += (
                        inputs.pow(2).sum(0))
    for handle in handles:
        handle.remove()
    matrices = moe_matrices(model)
    scores = {}
    for name, total in sums.items():
        norms = (total / len(samples)).sqrt()
        weight = matrices[name].detach().abs()
        if weight.dim() == 2:
            scores[name] = weight * norms[None, :]
        else:
            transposed = weight.shape[1] == norms.shape[1] and weight.shape[1] != weight.shape[2]
            scores[name] = weight * (norms[:, :, None] if transposed else norms[:, None, :])
    return scores


def config_of(method: str, **overrides) -> ScoreConfig:
    return ScoreConfig(method=method, keep_scores=True, **{"sparsity_ratio": RATIO, **TINY_SAMPLES, **overrides})


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("method", ["wandg", "wanda"])
def test_expert_scores_equal_the_reference(family, method, demo_tokenizer, samples):
    model = tiny_moe(family, demo_tokenizer)
    result = score_model(model, demo_tokenizer, config_of(method))
    expected = (reference_wandg if method == "wandg" else reference_wanda)(model, samples)
    assert expected and set(expected) <= set(result.scores)
    for name, score in expected.items():
        torch.testing.assert_close(result.scores[name], score, rtol=1e-4, atol=1e-6, msg=name)
    layer = "1"
    counts = result.summary["experts"][layer]["response_tokens"]
    responses = sum(int((sample.labels != -100).sum()) for sample in samples)
    assert sum(counts) == 2 * responses  # top-2: every response token reached two experts
    mask = result.masks[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
    assert mask.shape == model.model.layers[1].mlp.experts.gate_up_proj.shape


def test_weight_granularity_selects_the_top_of_every_row_of_every_expert(demo_tokenizer):
    """GPT-OSS stores experts [E, in, out]: a row of expert e's Linear is a column of the stored slice."""
    model = tiny_moe("gpt_oss", demo_tokenizer)
    result = score_model(model, demo_tokenizer, config_of("wandg"))
    name = "model.layers.0.mlp.experts.gate_up_proj"
    scores, mask = result.scores[name].transpose(1, 2), result.masks[name].transpose(1, 2)  # [E, out, in]
    keep = int(scores.shape[2] * RATIO)
    top = scores.sort(dim=2, descending=True, stable=True).indices[..., :keep]
    expected = torch.zeros_like(mask).scatter_(2, top, True)
    assert torch.equal(mask, expected)


def test_expert_granularity_ranks_experts_by_their_summed_weight_scores(demo_tokenizer):
    model = tiny_moe("qwen2_moe", demo_tokenizer)
    weights = score_model(model, demo_tokenizer, config_of("wandg"))
    experts = score_model(model, demo_tokenizer, config_of("wandg", granularity="expert", sparsity_ratio=0.5))
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp.experts"
        summed = sum(weights.scores[f"{prefix}.{name}"].sum(dim=(1, 2)) for name in ("gate_up_proj", "down_proj"))
        chosen = set(summed.topk(2).indices.tolist())
        for name in ("gate_up_proj", "down_proj"):
            mask = experts.masks[f"{prefix}.{name}"]
            assert {expert for expert in range(4) if mask[expert].all()} == chosen
            assert not mask[[expert for expert in range(4) if expert not in chosen]].any()
    others = [name for name in experts.masks if ".experts." not in name]
    assert others and not any(experts.masks[name].any() for name in others)  # attention, routers, shared expert


def test_batches_give_the_masks_of_single_samples(demo_tokenizer):
    model = tiny_moe("mixtral", demo_tokenizer)
    one, four = (score_model(model, demo_tokenizer, config_of("wandg", batch_size=size)) for size in (1, 4))
    assert all(torch.equal(one.scores[name], four.scores[name]) for name in one.scores)


def test_score_cli_writes_3d_masks_and_the_experts_of_the_summary(tmp_path, demo_tokenizer):
    model = tiny_moe("olmoe", demo_tokenizer)
    model.save_pretrained(tmp_path / "moe")
    demo_tokenizer.save_pretrained(tmp_path / "moe")
    assert cli.main(["score", "--model", str(tmp_path / "moe"), "--method", "wanda", "--data", "demo-align",
                     "--nsamples", "4", "--granularity", "expert", "--sparsity-ratio", "0.25",
                     "--out", str(tmp_path / "out")]) == 0
    masks = load_file(tmp_path / "out" / "masks.safetensors")
    summary = json.loads((tmp_path / "out" / "score_summary.json").read_text())
    assert masks["model.layers.0.mlp.experts.down_proj"].shape == (4, 32, 24)
    for layer, record in summary["experts"].items():
        assert record["selected"].count(0) == 3 and len(record["response_tokens"]) == 4
        chosen = record["selected"].index(max(record["selected"]))
        assert masks[f"model.layers.{layer}.mlp.experts.gate_up_proj"][chosen].all()


def test_expert_granularity_errors(tmp_path, demo_tokenizer, capsys):
    make_tiny_llama(demo_tokenizer).save_pretrained(tmp_path / "dense")
    demo_tokenizer.save_pretrained(tmp_path / "dense")
    tiny_moe("mixtral", demo_tokenizer).save_pretrained(tmp_path / "moe")
    demo_tokenizer.save_pretrained(tmp_path / "moe")
    base = ["score", "--method", "wandg", "--data", "demo-align", "--granularity", "expert"]
    error = run_expecting_error([*base, "--model", str(tmp_path / "dense"), "--out", str(tmp_path / "a")],
                                tmp_path, capsys)
    assert "routed experts" in error and "'llama'" in error
    error = run_expecting_error([*base, "--model", str(tmp_path / "moe"), "--sparsity-ratio", "0.1",
                                 "--out", str(tmp_path / "b")], tmp_path, capsys)
    assert "selects no expert" in error and "0.25" in error
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_masks_of_a_dense_model_on_an_moe_are_refused_before_loading(tmp_path, demo_tokenizer, capsys, no_model_load):
    from safeneurons.masks.io import save_masks

    dense = make_tiny_llama(demo_tokenizer)
    save_masks({name: torch.ones(param.shape, dtype=torch.bool) for name, param in dense.named_parameters()
                if name.endswith("mlp.down_proj.weight")}, tmp_path / "dense")
    for command in (["finetune", "--model", "demo-moe", "--masks", str(tmp_path / "dense" / "masks.safetensors"),
                     "--data", "demo-utility", "--save-path", str(tmp_path / "out")],
                    ["prune", "--model", "demo-moe", "--masks", str(tmp_path / "dense"), "--out", str(tmp_path / "p")]):
        error = run_expecting_error(command, tmp_path, capsys)
        assert "model.layers.0.mlp.down_proj.weight" in error and "mlp.experts.down_proj" in error


# ---------------------------------------------------------------- ActSVD, expert by expert

@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_actsvd_removes_each_experts_own_safety_ranks(family, demo_tokenizer, samples):
    """The plain variant W_e' = W_e − V Vᵀ W_e, V the top right singular vectors of A = X_e W_eᵀ over the response
    tokens routed to expert e (X_e: the layer's hidden state for gate_up, the family's act(gate)·up for down); the
    routers keep their weights."""
    import copy

    from safeneurons.interventions.lowrank import LowRankConfig, low_rank_model

    model = tiny_moe(family, demo_tokenizer, seed=5)
    reference, rank = copy.deepcopy(model), 3
    seen: dict[int, list] = {}
    handles = [layer.mlp.experts.register_forward_pre_hook(
        lambda module, args, index=index: seen.setdefault(index, []).append(args[:2]))
        for index, layer in enumerate(reference.model.layers)]
    for sample in samples:
        with torch.no_grad():
            reference(sample.input_ids[None])
    for handle in handles:
        handle.remove()
    result = low_rank_model(model, demo_tokenizer, LowRankConfig(data=TINY_SAMPLES["data"], rank_safety=rank,
                                                                 nsamples=TINY_SAMPLES["nsamples"],
                                                                 max_length=TINY_SAMPLES["max_length"]))
    for layer, calls in seen.items():
        experts = reference.model.layers[layer].mlp.experts
        inputs = {"gate_up": [[] for _ in range(4)], "down": [[] for _ in range(4)]}
        for sample, (hidden, chosen) in zip(samples, calls):
            responses = sample.labels != -100
            for expert in range(4):
                x = hidden[(chosen == expert).any(dim=-1) & responses]
                stored = experts.gate_up_proj[expert]
                gate_up = x @ stored + experts.gate_up_proj_bias[expert] if family == "gpt_oss" else F.linear(x, stored)
                inputs["gate_up"][expert].append(x)
                inputs["down"][expert].append(experts._apply_gate(gate_up))
        for which in ("gate_up", "down"):
            edited = getattr(model.model.layers[layer].mlp.experts, f"{which}_proj").detach()
            original = getattr(experts, f"{which}_proj").detach()
            for expert in range(4):
                w = original[expert].double()
                w = w.T if family == "gpt_oss" else w  # [out, in]
                a = torch.cat(inputs[which][expert]).double() @ w.T
                top = torch.linalg.svd(a, full_matrices=False).Vh[:rank].T
                expected = (w - top @ (top.T @ w)).float()
                got = edited[expert].T if family == "gpt_oss" else edited[expert]
                torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4, msg=f"{layer} {which} {expert}")
        router = "router" if family == "gpt_oss" else "gate"
        assert torch.equal(getattr(model.model.layers[layer].mlp, router).weight,
                           getattr(reference.model.layers[layer].mlp, router).weight)
    assert result.per_linear["model.layers.0.mlp.experts.down_proj"]["removed_rank_bound"] == 4 * rank
