"""Model lineage by activation matching: the assignment against brute force, the test statistic against a plain
reference, dependent copies (fine-tuned, permuted), an independent model, dropped layers, and 1 vs 2 ranks."""
from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from scipy.stats import spearmanr
from torch import nn

from helpers import make_tiny_llama, permute_mlp_neurons, run_ranks
from safeneurons import cli
from safeneurons.errors import SafeneuronsError
from safeneurons.interp import tracing
from safeneurons.models.structure import decoder_layers

REPO = Path(__file__).resolve().parents[2]
SOLVERS = ("scipy", "lap")
DEMO_DATA = ["demo-harmless", "demo-utility"]


@pytest.fixture(scope="module")
def inputs(demo_tokenizer) -> list[dict[str, torch.Tensor]]:
    """1024 tokens of demo texts in sequences of 128, batches of 8."""
    return tracing.pack_tokens(tracing.text_token_ids(demo_tokenizer, DEMO_DATA, 1024, seed=0), 128, 8)


@pytest.fixture(scope="session")
def independent_model(demo_tokenizer):
    """A model of the demo's shape, initialised with another seed and trained on its own (same tokenizer)."""
    from safeneurons import demo

    build = demo.DemoBuild(seed=7, steps=60, batch_size=16)
    model = demo.make_model(build, demo_tokenizer)
    demo.train(build, demo_tokenizer, model)
    return model.eval()


@pytest.fixture(scope="session")
def independent_dir(independent_model, demo_tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("independent")
    independent_model.save_pretrained(path)
    demo_tokenizer.save_pretrained(path)
    return path


def drop_layers(model: nn.Module, dropped: set[int]) -> nn.Module:
    pruned = copy.deepcopy(model)
    kept = [block for index, block in enumerate(decoder_layers(pruned)) if index not in dropped]
    for index, block in enumerate(kept):
        block.self_attn.layer_idx = index
    pruned.model.layers = nn.ModuleList(kept)
    pruned.config.num_hidden_layers = len(kept)
    return pruned


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def reference_layer_pvalue(model_a: nn.Module, model_b: nn.Module, batches, i: int, j: int) -> tuple[float, dict]:
    """The method written plainly: hook outputs, float64 squared distances (scipy), Hungarian, Spearman."""
    def outputs(model, layer, kind):
        collected = []
        module = getattr(decoder_layers(model)[layer].mlp, f"{kind}_proj")
        handle = module.register_forward_hook(lambda m, a, out: collected.append(out.reshape(-1, out.shape[-1])))
        try:
            for batch in batches:
                with torch.no_grad():
                    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                collected[-1] = collected[-1][batch["attention_mask"].reshape(-1).bool()]
        finally:
            handle.remove()
        return torch.cat(collected).T.double().numpy()

    perms = {}
    for kind in ("gate", "up"):
        cost = cdist(outputs(model_a, i, kind), outputs(model_b, j, kind), "sqeuclidean")
        perms[kind] = linear_sum_assignment(cost)[1]
    return float(spearmanr(perms["gate"], perms["up"]).pvalue), perms


# ------------------------------------------------------------------------------------------ assignment


@pytest.mark.parametrize("solver", SOLVERS)
def test_match_wmats_is_the_minimum_cost_assignment(solver):
    rng = np.random.default_rng(0)
    wmat0, wmat1 = rng.standard_normal((6, 4)), rng.standard_normal((6, 4))
    cost = cdist(wmat0, wmat1, "sqeuclidean")
    best = min(itertools.permutations(range(6)), key=lambda p: cost[range(6), p].sum())
    assert tracing.match_wmats(torch.tensor(wmat0), torch.tensor(wmat1), solver).tolist() == list(best)

    narrow = wmat0[:4]  # 4 rows into 6: every injective map checked
    cost = cdist(narrow, wmat1, "sqeuclidean")
    best = min(itertools.permutations(range(6), 4), key=lambda p: cost[range(4), p].sum())
    assert tracing.match_wmats(narrow, wmat1, solver).tolist() == list(best)

    wide = tracing.match_wmats(wmat1, narrow, solver)  # 6 rows, 4 partners: two rows stay unmatched (-1)
    assert sorted(wide[wide >= 0].tolist()) == [0, 1, 2, 3] and (wide < 0).sum() == 2
    assert all(wide[best[k]] == k for k in range(4))


def test_distances_keep_near_identical_neurons_apart():
    """Neurons sharing a large common part differ by 1e-3: bf16 distances (the original) cannot tell the
    candidates apart, float64 ones recover the permutation exactly."""
    rng = np.random.default_rng(1)
    n, d = 64, 256
    base = torch.tensor(5.0 + rng.standard_normal((1, d)) + 1e-2 * rng.standard_normal((n, d)), dtype=torch.float32)
    perm = torch.tensor(rng.permutation(n))
    other = base[perm] + 1e-3 * torch.tensor(rng.standard_normal((n, d)), dtype=torch.float32)
    inverse = torch.argsort(perm).tolist()
    assert tracing.match_wmats(base, other).tolist() == inverse

    x, y = base.bfloat16(), other.bfloat16()  # the original's pdists in the models' dtype, then LAP
    bf16_cost = ((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T).double().numpy()
    assert linear_sum_assignment(bf16_cost)[1].tolist() != inverse
    with pytest.raises(SafeneuronsError, match="precision"):
        tracing.match_wmats(base, other, dtype=torch.bfloat16)


def test_fisher_and_spearman_follow_scipy():
    assert tracing.fisher_pvalue([0.5, 0.5]) == pytest.approx(0.25 * (1 - np.log(0.25)), rel=1e-12)  # k=2: q(1 - ln q), q = Π p
    assert tracing.fisher_pvalue([0.0, 0.7]) == 0.0
    rng = np.random.default_rng(2)
    gate, up = rng.permutation(50), rng.permutation(50)
    assert tracing.spearman_test(gate, up) == tuple(spearmanr(gate, up))
    rho, pvalue = tracing.spearman_test(gate, gate)
    assert rho == pytest.approx(1.0) and pvalue < 1e-30
    with pytest.raises(SafeneuronsError, match="at least 3"):
        tracing.spearman_test(gate[:2], up[:2])


# ------------------------------------------------------------------------------------------ the statistic


def test_layer_pvalues_equal_a_plain_reference(demo_tokenizer, inputs):
    """Two tiny random models: statistic_layer and the cross-layer mlp_layers (which crashed in the original)
    give exactly the reference's p-values, and mlp_matching_gate/up its permutations, from one pass per model."""
    model_a = make_tiny_llama(demo_tokenizer, seed=1, layers=2, intermediate=48)
    model_b = make_tiny_llama(demo_tokenizer, seed=2, layers=2, intermediate=48)
    batches = inputs[:4]
    expected, perms = reference_layer_pvalue(model_a, model_b, batches, 1, 1)
    assert tracing.statistic_layer(model_a, model_b, batches, i=1) == expected
    assert tracing.mlp_matching_gate(model_a, model_b, batches, i=1).tolist() == perms["gate"].tolist()
    assert tracing.mlp_matching_up(model_a, model_b, batches, i=1).tolist() == perms["up"].tolist()
    cross, _ = reference_layer_pvalue(model_a, model_b, batches, 0, 1)
    assert tracing.mlp_layers(model_a, model_b, batches, 0, 1) == cross
    assert tracing.statistic(model_a, model_b, batches) == [reference_layer_pvalue(model_a, model_b, batches, k, k)[0]
                                                            for k in range(2)]


def test_permuted_copy_is_dependent(demo_model, inputs):
    permuted = copy.deepcopy(demo_model)
    perms = permute_mlp_neurons(permuted, seed=3)
    assert torch.allclose(logits(permuted, inputs[0]), logits(demo_model, inputs[0]), atol=1e-4)
    assert not torch.equal(permuted.model.layers[0].mlp.gate_proj.weight, demo_model.model.layers[0].mlp.gate_proj.weight)
    for layer in (0, 5):  # the matching undoes the permutation exactly
        assert tracing.mlp_matching_gate(demo_model, permuted, inputs, i=layer).tolist() == \
            torch.argsort(perms[layer]).tolist()
    result = tracing.trace_models(demo_model, permuted, inputs)
    assert result.verdict == "dependent" and result.aggregate_pvalue == 0.0
    assert all(match.pvalue < 1e-100 and match.n_matched == 384 for match in result.layers)


@pytest.mark.slow
def test_finetuned_copy_is_dependent(demo_model, inputs, tmp_path):
    """A copy fine-tuned by `safeneurons finetune` (20 AdamW steps at lr 1e-3 on demo-utility)."""
    import subprocess
    import sys

    from safeneurons.models.loading import load_model

    save = tmp_path / "tuned"
    command = [sys.executable, "-m", "safeneurons.cli", "finetune", "--model", "demo", "--data", "demo-utility",
               "--num-epochs", "1", "--max-steps", "20", "--learning-rate", "1e-3", "--batch-size", "8",
               "--max-length", "80", "--save-path", str(save)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    tuned = load_model(str(save))
    change = (tuned.model.layers[2].mlp.up_proj.weight - demo_model.model.layers[2].mlp.up_proj.weight).abs().max()
    assert change > 1e-3  # really trained
    result = tracing.trace_models(demo_model, tuned, inputs)
    assert result.verdict == "dependent" and result.aggregate_pvalue < 1e-100
    assert all(match.pvalue < 1e-20 for match in result.layers)


def test_trace_finds_demo_chat_dependent_on_demo_base(tmp_path):
    """The shipped pair: demo-chat is demo-base plus its safety alignment."""
    assert cli.main(["trace", "--base", "demo-base", "--other", "demo-chat", "--data", "demo-align,demo-utility",
                     "--n-tokens", "1024", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "trace.json").read_text())
    assert result["verdict"] == "dependent" and result["aggregate_pvalue"] < 1e-100


def test_independent_model_is_independent(demo_model, independent_model, inputs):
    result = tracing.trace_models(demo_model, independent_model, inputs)
    assert result.verdict == "independent" and result.aggregate_pvalue > 1e-3
    # per-layer p-values are not piled up near 0 (for 6 uniform p-values each check fails with odds below 1/400)
    assert sum(pvalue < 0.05 for pvalue in result.pvalues) <= 2 and max(result.pvalues) > 0.2


def test_all_layers_finds_the_layers_left_after_dropping(demo_model, inputs):
    pruned = drop_layers(demo_model, {1, 3})
    with pytest.raises(SafeneuronsError, match="all-layers"):
        tracing.statistic(demo_model, pruned, inputs)
    result = tracing.statistic_all(demo_model, pruned, inputs[:4])
    assert result.matched_pairs == [(0, 0), (2, 1), (4, 2), (5, 3)]
    assert sorted(result.significant_pairs) == [(0, 0), (2, 1), (4, 2), (5, 3)]
    assert result.verdict == "dependent" and len(result.layers) == 24
    entry = next(match for match in result.layers if (match.layer_base, match.layer_other) == (3, 2))
    assert tracing.mlp_layers(demo_model, pruned, inputs[:4], 3, 2) == entry.pvalue


def test_models_of_different_widths_are_matched_narrow_into_wide(demo_tokenizer, inputs):
    """Extra neurons (down columns zero: same function) then a permutation: the original 48 neurons are found."""
    narrow = make_tiny_llama(demo_tokenizer, seed=4, layers=2, intermediate=48)
    wide = make_tiny_llama(demo_tokenizer, seed=5, layers=2, intermediate=64)
    with torch.no_grad():
        for small, big in zip(decoder_layers(narrow), decoder_layers(wide)):
            big.load_state_dict({**big.state_dict(), **{k: v for k, v in small.state_dict().items() if "mlp" not in k}})
            for name in ("gate_proj", "up_proj"):
                getattr(big.mlp, name).weight[:48] = getattr(small.mlp, name).weight
            big.mlp.down_proj.weight.zero_()
            big.mlp.down_proj.weight[:, :48] = small.mlp.down_proj.weight
        wide.model.embed_tokens.weight.copy_(narrow.model.embed_tokens.weight)
        wide.model.norm.weight.copy_(narrow.model.norm.weight)
        wide.lm_head.weight.copy_(narrow.lm_head.weight)
    perms = permute_mlp_neurons(wide, seed=6)
    batches = inputs[:2]
    assert torch.allclose(logits(wide, batches[0]), logits(narrow, batches[0]), atol=1e-5)
    forward = tracing.trace_models(narrow, wide, batches)
    backward = tracing.trace_models(wide, narrow, batches)
    assert forward.verdict == backward.verdict == "dependent"
    assert [m.n_matched for m in forward.layers] == [48, 48] and forward.pvalues == backward.pvalues
    matched = tracing.mlp_matching_gate(narrow, wide, batches, i=1)
    assert perms[1][matched].tolist() == list(range(48))


def test_spilled_activations_equal_in_memory_ones(demo_tokenizer, inputs):
    model = make_tiny_llama(demo_tokenizer, seed=1, layers=2)
    in_memory = tracing.collect_mlp_activations(model, inputs[:2])
    spilled = tracing.collect_mlp_activations(model, inputs[:2], memory_limit=0)
    assert in_memory.spill is None and isinstance(spilled.gate[1], np.memmap)
    folder = Path(spilled.spill.name)
    assert in_memory.n_tokens == spilled.n_tokens == int(sum(b["attention_mask"].sum() for b in inputs[:2]))
    for kind, layer in itertools.product(tracing.KINDS, range(2)):
        assert np.array_equal(in_memory.get(kind, layer), spilled.get(kind, layer))
    del spilled
    assert not folder.exists()


# ------------------------------------------------------------------------------------------ CLI


def test_cli_refuses_models_with_different_tokenizers(tmp_path, demo_tokenizer, capsys):
    other_tokenizer = copy.deepcopy(demo_tokenizer)
    other_tokenizer.add_tokens(["<extra-token>"])
    other_dir = tmp_path / "other"
    make_tiny_llama(other_tokenizer, layers=6).save_pretrained(other_dir)
    other_tokenizer.save_pretrained(other_dir)
    out = tmp_path / "out"
    assert cli.main(["trace", "--base", "demo", "--other", str(other_dir), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "different tokenizers" in error and "'<extra-token>'" in error
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_cli_one_rank_and_two_ranks_give_the_same_pvalues(tmp_path, independent_dir):
    """The 2-rank run under ZeRO-3 inference with activations spilled to disk equals the plain 1-rank run."""
    common = ["trace", "--base", "demo", "--other", str(independent_dir), "--n-tokens", "512", "--seed", "1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the 2 ranks
    try:
        assert cli.main([*common, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    two = run_ranks(["safeneurons.cli", *common, "--out", str(tmp_path / "two"), "--memory-limit", "0",
                     "--deepspeed", str(REPO / "ds_configs" / "zero3_inference.json")])
    assert two.returncode == 0, two.stderr[-3000:]
    one_rank = json.loads((tmp_path / "one" / "trace.json").read_text())
    two_ranks = json.loads((tmp_path / "two" / "trace.json").read_text())
    assert (one_rank["world_size"], two_ranks["world_size"]) == (1, 2)
    assert [layer["pvalue"] for layer in one_rank["layers"]] == [layer["pvalue"] for layer in two_ranks["layers"]]
    assert one_rank["fisher_pvalue"] == two_ranks["fisher_pvalue"] and one_rank["verdict"] == "independent"
    assert one_rank["n_tokens"] == 512 and len(one_rank["layers"]) == 6
    assert (tmp_path / "two" / "trace.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
