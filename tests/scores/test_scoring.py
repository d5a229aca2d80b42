"""`safeneurons score`: scores and masks against independent straightforward references (per-layer loops,
per-sample `loss.backward()` with `param.grad`), selection rules, the CLI's files and its errors."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import LINEAR_NAMES, RATIO, TINY_SAMPLES, make_tiny_llama, reference_masks
from safeneurons import SafeneuronsError, cli
from safeneurons.data.samples import load_samples
from safeneurons.interventions.analyzer import SafetyNeuronAnalyzer
from safeneurons.masks.io import load_masks
from safeneurons.scores.config import ScoreConfig
from safeneurons.scores.schedules import score_model

# ---------------------------------------------------------------- the independent reference


@pytest.fixture(scope="module")
def tiny_model(demo_tokenizer):
    return make_tiny_llama(demo_tokenizer, seed=3, layers=2, hidden=32, intermediate=64, heads=4)


@pytest.fixture(scope="module")
def tiny_samples(demo_tokenizer):
    return load_samples(TINY_SAMPLES["data"], demo_tokenizer, TINY_SAMPLES["nsamples"], TINY_SAMPLES["seed"],
                        TINY_SAMPLES["max_length"])


def tiny_config(method: str, **overrides) -> ScoreConfig:
    return ScoreConfig(method=method, keep_scores=True, **{"sparsity_ratio": RATIO, **TINY_SAMPLES, **overrides})


# ---------------------------------------------------------------- scores and masks equal the reference

@pytest.mark.parametrize("method,sequential,batch_size", [
    ("wanda", False, 1), ("wandg", False, 1), ("wanda", True, 1), ("wandg", True, 1),
    ("wanda", False, 4), ("wandg", False, 4),  # padded micro-batches keep per-sample statistics
])
def test_masks_equal_reference(tiny_model, tiny_samples, demo_tokenizer, method, sequential, batch_size):
    before = {name: param.detach().clone() for name, param in tiny_model.named_parameters()}
    config = tiny_config(method, sequential=sequential, batch_size=batch_size)
    result = score_model(tiny_model, demo_tokenizer, config)
    expected_masks, expected_scores = reference_masks(tiny_model, tiny_samples, method, RATIO, sequential)
    assert list(result.masks) == list(expected_masks)
    for name, expected in expected_masks.items():
        assert torch.equal(result.masks[name], expected), name
        torch.testing.assert_close(result.scores[name], expected_scores[name], rtol=1e-5, atol=1e-7)
    assert all(torch.equal(param, before[name]) for name, param in tiny_model.named_parameters())


@pytest.mark.parametrize("fraction", [0.0, 0.3])
def test_rounds_of_accumulators_give_the_one_round_scores_bit_for_bit(tiny_model, demo_tokenizer, fraction):
    """A budget below the sums of all Linears takes them in rounds (1 byte: one Linear per round); each Linear's
    sum still adds the same samples in the same order."""
    from safeneurons.scores.config import targets_of
    from safeneurons.scores.statistics import accumulation_rounds, accumulator_bytes

    targets = targets_of(tiny_model)
    budget = max(1, int(fraction * accumulator_bytes(targets, 16)))  # exact sums: 16 bytes a weight
    rounds = accumulation_rounds(targets, budget, 16)
    assert [target for group in rounds for target in group] == targets and len(rounds) > 1
    assert all(len(group) == 1 or accumulator_bytes(group, 16) <= budget for group in rounds)
    whole = score_model(tiny_model, demo_tokenizer, tiny_config("wandg"))
    in_rounds = score_model(tiny_model, demo_tokenizer, tiny_config("wandg", score_memory=budget))
    for name, score in whole.scores.items():
        assert torch.equal(in_rounds.scores[name], score), name


def test_sequential_differs_from_default(tiny_model, demo_tokenizer):
    """Pruning earlier layers changes later layers' gradients: the two schedules are not the same algorithm."""
    default = score_model(tiny_model, demo_tokenizer, tiny_config("wandg"))
    sequential = score_model(tiny_model, demo_tokenizer, tiny_config("wandg", sequential=True))
    first = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(default.scores[first], sequential.scores[first])  # layer 0 sees the same model
    last = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(default.scores[last], sequential.scores[last])


def test_selected_count_per_row_is_exact(tiny_model, demo_tokenizer):
    result = score_model(tiny_model, demo_tokenizer, tiny_config("wanda"))
    for name, mask in result.masks.items():
        expected = int(mask.shape[1] * RATIO)
        assert mask.dtype == torch.bool
        assert (mask.sum(dim=1) == expected).all(), name
        lowest_selected = torch.where(mask, result.scores[name], torch.inf).min(dim=1).values
        highest_unselected = torch.where(mask, -torch.inf, result.scores[name]).max(dim=1).values
        assert (lowest_selected >= highest_unselected).all(), name
    summary = result.summary
    assert summary["total_selected"] == sum(int(m.sum()) for m in result.masks.values())
    assert summary["total_scored"] == sum(m.numel() for m in result.masks.values())


def test_neuron_granularity_selects_whole_rows_by_summed_score(tiny_model, demo_tokenizer):
    result = score_model(tiny_model, demo_tokenizer, tiny_config("wandg", granularity="neuron"))
    for name, mask in result.masks.items():
        rows = mask.all(dim=1)
        assert torch.equal(mask.any(dim=1), rows), name  # whole rows only
        assert int(rows.sum()) == int(mask.shape[0] * RATIO)
        row_scores = result.scores[name].sum(dim=1)
        assert row_scores[rows].min() >= row_scores[~rows].max(), name


def test_set_difference_is_top_q_safety_minus_top_p_utility(tiny_model, demo_tokenizer):
    p, q = 0.2, 0.25
    result = score_model(tiny_model, demo_tokenizer, tiny_config("wanda", utility_data="demo-utility", p=p, q=q))
    utility = score_model(tiny_model, demo_tokenizer, tiny_config("wanda", data="demo-utility"))
    assert result.summary["utility_data"] == "demo-utility"
    for name, mask in result.masks.items():
        safety_flat, utility_flat = result.scores[name].flatten(), utility.scores[name].flatten()
        top_q = set(torch.argsort(safety_flat, descending=True)[:int(q * safety_flat.numel())].tolist())
        top_p = set(torch.argsort(utility_flat, descending=True)[:int(p * utility_flat.numel())].tolist())
        assert set(torch.nonzero(mask.flatten()).flatten().tolist()) == top_q - top_p, name
        assert 0 < int(mask.sum()) < len(top_q)  # the utility set really removes something


def test_set_difference_per_row_is_each_row_s_top_q_minus_its_top_p(tiny_model, demo_tokenizer):
    """--setdiff-scope row, the paper's description (the original code's issue #14): each row on its own."""
    p, q = 0.2, 0.25
    result = score_model(tiny_model, demo_tokenizer,
                         tiny_config("wanda", utility_data="demo-utility", p=p, q=q, setdiff_scope="row"))
    matrix = score_model(tiny_model, demo_tokenizer, tiny_config("wanda", utility_data="demo-utility", p=p, q=q))
    utility = score_model(tiny_model, demo_tokenizer, tiny_config("wanda", data="demo-utility"))
    assert result.summary["setdiff_scope"] == "row" and matrix.summary["setdiff_scope"] == "matrix"
    differs = False
    for name, mask in result.masks.items():
        safety, useful = result.scores[name], utility.scores[name]
        for row in range(mask.shape[0]):
            cols = mask.shape[1]
            top_q = set(sorted(range(cols), key=lambda col: -safety[row, col].item())[:int(q * cols)])
            top_p = set(sorted(range(cols), key=lambda col: -useful[row, col].item())[:int(p * cols)])
            assert set(torch.nonzero(mask[row]).flatten().tolist()) == top_q - top_p, (name, row)
        differs |= not torch.equal(mask, matrix.masks[name])
    assert differs  # the two scopes are different selections


@pytest.mark.parametrize("overrides, message", [
    (dict(setdiff_scope="diagonal"), "--setdiff-scope 'diagonal' is not one of matrix, row"),
    (dict(setdiff_scope="row", granularity="neuron"), "--setdiff-scope row ranks the weights of each row"),
])
def test_a_bad_setdiff_scope_is_one_clear_error(overrides, message):
    with pytest.raises(SafeneuronsError, match=re.escape(message)):
        tiny_config("wanda", utility_data="demo-utility", p=0.1, q=0.1, **overrides).validate()


def test_random_has_the_same_counts_and_depends_on_the_seed(tiny_model, demo_tokenizer):
    wandg = score_model(tiny_model, demo_tokenizer, tiny_config("wandg"))
    random_0 = score_model(tiny_model, demo_tokenizer, tiny_config("random"))
    random_1 = score_model(tiny_model, demo_tokenizer, tiny_config("random", seed=1))
    again = score_model(tiny_model, demo_tokenizer, tiny_config("random"))
    for name, mask in wandg.masks.items():
        assert torch.equal(random_0.masks[name].sum(dim=1), mask.sum(dim=1))
        assert torch.equal(random_0.masks[name], again.masks[name])
        assert not torch.equal(random_0.masks[name], random_1.masks[name])
        assert not torch.equal(random_0.masks[name], mask)


@pytest.mark.parametrize("method", ["wanda", "wandg"])
def test_nan_weight_is_an_error_naming_the_parameter(tiny_model, demo_tokenizer, method):
    broken = copy.deepcopy(tiny_model)
    with torch.no_grad():
        broken.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(SafeneuronsError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        score_model(broken, demo_tokenizer, tiny_config(method))


def test_model_without_the_expected_linears_is_an_error(tiny_model, demo_tokenizer):
    broken = copy.deepcopy(tiny_model)
    broken.model.layers[0].mlp.gate_proj = torch.nn.Identity()
    with pytest.raises(SafeneuronsError, match="layer 0 does not have the structure"):
        score_model(broken, demo_tokenizer, tiny_config("wanda"))


@pytest.mark.parametrize("overrides,message", [
    (dict(sparsity_ratio=0.0), "sparsity ratio"), (dict(sparsity_ratio=1.0), "sparsity ratio"),
    (dict(method="magnitude"), "unknown scoring method"), (dict(p=0.0, q=0.5), "--p"),
    (dict(p=0.5, q=1.5), "--q"), (dict(p=0.5), "--q is missing"), (dict(granularity="layer"), "granularity"),
    (dict(granularity="head", p=0.1, q=0.1), "set difference"),
])
def test_bad_config_is_rejected(overrides, message):
    config = ScoreConfig(**{"method": "wanda", "data": "demo-align", "sparsity_ratio": 0.1, **overrides})
    with pytest.raises(SafeneuronsError, match=message):
        config.validate()


# ---------------------------------------------------------------- the CLI on the demo model

DEMO_ARGS = ["--model", "demo", "--data", "demo-align", "--nsamples", "8", "--max-length", "64",
             "--sparsity-ratio", "0.05"]


@pytest.fixture(scope="module")
def demo_wanda_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("score") / "wanda"
    assert cli.main(["score", "--method", "wanda", *DEMO_ARGS, "--save-scores", "--out", str(out)]) == 0
    return out


def test_cli_files_name_the_models_parameters(demo_wanda_out, demo_model):
    params = dict(demo_model.named_parameters())
    masks = load_masks(demo_wanda_out)
    scores = load_file(str(demo_wanda_out / "scores.safetensors"))
    expected = [f"model.layers.{layer}.{name}.weight" for layer in range(len(demo_model.model.layers))
                for name in LINEAR_NAMES]
    assert sorted(masks) == sorted(expected) and sorted(scores) == sorted(expected)
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == params[name].shape
        assert scores[name].dtype == torch.float32 and scores[name].shape == params[name].shape
        assert torch.isfinite(scores[name]).all()
    summary = json.loads((demo_wanda_out / "score_summary.json").read_text())
    assert summary["method"] == "wanda" and summary["world_size"] == 1 and summary["seed"] == 0
    assert summary["total_selected"] == sum(int(mask.sum()) for mask in masks.values())
    assert {name: counts["selected"] for name, counts in summary["per_parameter"].items()} == \
        {name: int(mask.sum()) for name, mask in masks.items()}
    assert summary["total_scored"] == sum(mask.numel() for mask in masks.values())


def test_python_api_gives_the_cli_masks(demo_wanda_out, demo_model, demo_tokenizer):
    analyzer = SafetyNeuronAnalyzer(copy.deepcopy(demo_model), demo_tokenizer)
    masks = analyzer.identify_safety_critical_neurons("wanda", "demo-align", 0.05, nsamples=8, seed=0)
    # the API keeps the original work's max_length 512; the demo samples are shorter than 64 tokens anyway
    cli_masks = load_masks(demo_wanda_out)
    assert masks.keys() == cli_masks.keys()
    assert all(torch.equal(masks[name], cli_masks[name]) for name in masks)


@pytest.mark.slow
def test_cli_reads_the_original_csv(shared_data, tmp_path):
    out = tmp_path / "csv"
    args = ["score", "--model", "demo", "--method", "wanda", "--data", "align_short", "--data_dir", str(shared_data),
            "--nsamples", "4", "--max_length", "96", "--sparsity_ratio", "0.03", "--granularity", "neuron",
            "--out", str(out)]
    assert cli.main(args) == 0
    summary = json.loads((out / "score_summary.json").read_text())
    assert summary["nsamples_used"] == {"safety": 4} and summary["granularity"] == "neuron"
    assert summary["total_selected"] > 0


@pytest.mark.parametrize("extra,message", [
    (["--method", "wanda", "--sparsity-ratio", "1.5"], "sparsity ratio"),
    (["--method", "wanda", "--sparsity-ratio", "0.1", "--p", "0", "--q", "0.5"], "--p"),
    (["--method", "snip", "--sparsity-ratio", "0.1"], "unknown scoring method"),
    (["--method", "wanda", "--sparsity-ratio", "0.1", "--max-length", "6"], "empty after truncation"),
    (["--method", "wandg", "--score-memory", "lots"], "--score-memory 'lots' is not a memory size"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    args = ["score", "--model", "demo", "--data", "demo-align", "--nsamples", "4", "--out", str(out), *extra]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_rejects_a_model_of_another_architecture(tmp_path, capsys, demo_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "gpt2"
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(demo_tokenizer)))
    gpt2.save_pretrained(model_dir)
    demo_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    args = ["score", "--model", str(model_dir), "--method", "wanda", "--data", "demo-align", "--sparsity-ratio", "0.1",
            "--out", str(out)]
    assert cli.main(args) == 2
    assert "no decoder layers at model.layers" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


def test_outputs_replace_a_previous_runs_shards(tmp_path):
    """A folder that held a 2-rank run's shards and index gets a 1-rank run's single file, and nothing stale."""
    from safeneurons.masks.io import INDEX_FILE, save_mask_shard, write_index
    from safeneurons.scores.config import ScoreResult
    from safeneurons.scores.outputs import write_score_outputs

    out = tmp_path / "out"
    old = {"model.layers.0.mlp.up_proj.weight": torch.ones(2, 3, dtype=torch.bool)}
    save_mask_shard(old, out, 0, 2)
    write_index(out, {name: "masks-00001-of-00002.safetensors" for name in old})
    new = {"model.layers.0.mlp.up_proj.weight": torch.tensor([[True, False, False], [False, True, False]])}
    write_score_outputs(ScoreResult(new, None, {"total_selected": 2}), out, save_scores=False)
    assert sorted(path.name for path in out.iterdir()) == ["masks.safetensors", "score_summary.json"]
    assert not (out / INDEX_FILE).exists()
    assert torch.equal(load_masks(out)["model.layers.0.mlp.up_proj.weight"], new["model.layers.0.mlp.up_proj.weight"])
    assert not (tmp_path / ".out.partial").exists()


# ---------------------------------------------------------------- agreement with the original code's recipe

def original_samples(csv_path, tokenizer, nsamples: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """lib/data.py get_align(disentangle=True): datasets' shuffle(seed).select(range(nsamples)); prompt tokens
    (BOS) + the response's tokens without their BOS, no EOS; prompt labels -100."""
    from datasets import load_dataset

    rows = load_dataset("csv", data_files={"train": str(csv_path)}, split="train").shuffle(seed=seed)
    rows = rows.select(range(nsamples))
    samples = []
    for prompt, response in zip(rows["prompt"], rows["response"]):
        prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
        inp = torch.cat((prompt_ids, tokenizer(response, return_tensors="pt").input_ids[:, 1:]), dim=1)
        tar = inp.clone()
        tar[:, :prompt_ids.shape[1]] = -100
        samples.append((inp, tar))
    return samples


def original_scores(model, samples, method: str) -> dict[str, torch.Tensor]:
    """lib/model_wrapper.py: wanda's running average of x² over response positions (ActLinear), or wandg's
    Σ |weight.grad| of `model(input_ids, labels).loss` per sample; score = |W| * statistic."""
    model = copy.deepcopy(model)
    linears = {f"{name}.weight": module for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and ".layers." in name}
    statistic = {name: torch.zeros_like(module.weight if method == "wandg" else module.weight[0])
                 for name, module in linears.items()}
    if method == "wanda":
        seen = {name: 0 for name in linears}
        for inp, tar in samples:
            mask = tar.ne(-100)

            def record(name):
                def hook(module, args, output):
                    x = args[0][mask]
                    rows = x.nelement() // x.shape[-1]
                    statistic[name] = (statistic[name] * (seen[name] / (seen[name] + rows))
                                       + (x * x).view(-1, x.shape[-1]).sum(dim=0) * (1.0 / (seen[name] + rows)))
                    seen[name] += rows
                return hook
            handles = [module.register_forward_hook(record(name)) for name, module in linears.items()]
            with torch.no_grad():
                model(inp)
            for handle in handles:
                handle.remove()
        return {name: linears[name].weight.detach().abs() * (statistic[name] ** 0.5)[None] for name in linears}
    model.requires_grad_(False)
    for module in linears.values():
        module.weight.requires_grad_(True)
    for inp, tar in samples:
        model.zero_grad()
        model(input_ids=inp, labels=tar)[0].backward()
        for name, module in linears.items():
            statistic[name] += module.weight.grad.abs()
    return {name: linears[name].weight.detach().abs() * statistic[name] for name in linears}


def original_top_per_row(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """_prune_core with neg_prune: sort −score (stable) and take the first int(cols × ratio) of every row."""
    indices = torch.sort(-score, dim=-1, stable=True)[1][:, :int(score.shape[1] * ratio)]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, indices, True)


def original_set_difference(utility: torch.Tensor, safety: torch.Tensor, p: float, q: float) -> torch.Tensor:
    """prune_wandg_set_difference: the top-q safety indices not among the top-p utility indices (largest)."""
    top_p = torch.topk(utility.flatten(), int(p * utility.numel()), largest=True)[1]
    top_q = torch.unique(torch.topk(safety.flatten(), int(q * safety.numel()), largest=True)[1])
    kept = top_q[~torch.isin(top_q, torch.unique(top_p))]
    return torch.zeros(safety.numel(), dtype=torch.bool).index_fill_(0, kept, True).view(safety.shape)


def agreement(ours: dict, reference: dict) -> float:
    """Fraction of the reference's selected weights that we select too (the counts are equal by construction)."""
    assert ours.keys() == reference.keys()
    assert all(int(ours[name].sum()) == int(reference[name].sum()) for name in reference)
    shared = sum(int((ours[name] & reference[name]).sum()) for name in reference)
    return shared / sum(int(mask.sum()) for mask in reference.values())


@pytest.fixture(scope="module")
def utility_csv(tmp_path_factory, demo_tokenizer):
    """demo-utility in the original CSV format (unnamed index, prompt in [INST] format, response, text)."""
    import pandas as pd

    from safeneurons.data.readers import load_examples
    from safeneurons.data.samples import prompt_text

    rows = [(prompt_text(demo_tokenizer, example), " " + example.response) for example in load_examples("demo-utility")]
    frame = pd.DataFrame({"prompt": [p for p, _ in rows], "response": [r for _, r in rows],
                          "text": [p + r for p, r in rows]})
    path = tmp_path_factory.mktemp("utility") / "utility.csv"
    frame.to_csv(path)
    return path


NSAMPLES, SEED = 16, 3


@pytest.mark.slow
@pytest.mark.parametrize("method", ["wanda", "wandg"])
def test_default_scoring_selects_what_the_original_code_selects(demo_model, demo_tokenizer, shared_data, method):
    csv = shared_data / "SFT_aligned_llama2-7b-chat-hf_train_short.csv"
    config = ScoreConfig(method=method, data=str(csv), sparsity_ratio=0.1, nsamples=NSAMPLES, seed=SEED,
                         max_length=1024)
    ours = score_model(demo_model, demo_tokenizer, config)
    assert ours.summary["add_eos"] is False
    reference = {name: original_top_per_row(score, 0.1) for name, score in
                 original_scores(demo_model, original_samples(csv, demo_tokenizer, NSAMPLES, SEED), method).items()}
    assert agreement(ours.masks, reference) >= 0.9999


@pytest.mark.slow
def test_default_set_difference_selects_what_the_original_code_selects(demo_model, demo_tokenizer, shared_data,
                                                                      utility_csv):
    csv = shared_data / "SFT_aligned_llama2-7b-chat-hf_train_short.csv"
    config = ScoreConfig(method="wandg", data=str(csv), sparsity_ratio=0.1, nsamples=NSAMPLES, seed=SEED,
                         max_length=1024, utility_data=str(utility_csv), p=0.05, q=0.05)
    ours = score_model(demo_model, demo_tokenizer, config)
    safety = original_scores(demo_model, original_samples(csv, demo_tokenizer, NSAMPLES, SEED), "wandg")
    utility = original_scores(demo_model, original_samples(utility_csv, demo_tokenizer, NSAMPLES, SEED), "wandg")
    reference = {name: original_set_difference(utility[name], safety[name], 0.05, 0.05) for name in safety}
    assert agreement(ours.masks, reference) >= 0.9999


@pytest.mark.parametrize("kv_heads", [4, 2])  # multi-head and grouped-query attention
def test_head_granularity_selects_whole_heads_by_their_summed_score(demo_tokenizer, kv_heads):
    model = make_tiny_llama(demo_tokenizer, seed=5, kv_heads=kv_heads)
    result = score_model(model, demo_tokenizer, tiny_config("wandg", granularity="head", sparsity_ratio=0.5))
    heads, head_dim, group = 4, 8, 4 // kv_heads
    for layer in range(2):
        def scores(name):
            return result.scores[f"model.layers.{layer}.{name}.weight"]

        def mask(name):
            return result.masks[f"model.layers.{layer}.{name}.weight"]
        # reference: a head's q rows + o columns + its share of the k/v rows of the key/value head it reads
        totals = []
        for head in range(heads):
            rows = slice(head * head_dim, (head + 1) * head_dim)
            kv_rows = slice((head // group) * head_dim, (head // group + 1) * head_dim)
            totals.append(float(scores("self_attn.q_proj")[rows].sum() + scores("self_attn.o_proj")[:, rows].sum()
                                + (scores("self_attn.k_proj")[kv_rows].sum()
                                   + scores("self_attn.v_proj")[kv_rows].sum()) / group))
        chosen = sorted(sorted(range(heads), key=lambda h: -totals[h])[:2])
        q_rows = mask("self_attn.q_proj").all(dim=1)
        assert mask("self_attn.q_proj").any(dim=1).tolist() == q_rows.tolist()  # whole rows
        assert [h for h in range(heads) if q_rows[h * head_dim:(h + 1) * head_dim].all()] == chosen
        assert q_rows.sum() == 2 * head_dim
        assert torch.equal(mask("self_attn.o_proj").all(dim=0), q_rows)
        kv_expected = [all(h in chosen for h in range(g * group, (g + 1) * group)) for g in range(kv_heads)]
        kv_rows = mask("self_attn.k_proj").all(dim=1).view(kv_heads, head_dim)
        assert kv_rows.all(dim=1).tolist() == kv_expected and torch.equal(mask("self_attn.v_proj"),
                                                                          mask("self_attn.k_proj"))
        assert not any(mask(f"mlp.{name}").any() for name in ("gate_proj", "up_proj", "down_proj"))


@pytest.mark.parametrize("method,batch_size", [("wandg", 1), ("wanda", 3)])
def test_sequential_passes_from_cached_layer_inputs_equal_reference(demo_tokenizer, tiny_samples, method,
                                                                    batch_size):
    """Deeper than two layers: each layer's passes start from the cached hidden states entering it."""
    model = make_tiny_llama(demo_tokenizer, seed=9, layers=4)
    result = score_model(model, demo_tokenizer, tiny_config(method, sequential=True, batch_size=batch_size))
    expected, _ = reference_masks(model, tiny_samples, method, RATIO, sequential=True)
    assert all(torch.equal(result.masks[name], mask) for name, mask in expected.items())
