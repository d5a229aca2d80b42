"""The refusal direction against an independent reference of the original's procedure (its means, positions,
filters and argmin, one candidate at a time with its own hooks), ablation removing the direction from every
block's output (Llama and Gemma-2's post-norms), orthogonalized weights equal to the ablation hooks (in memory,
streamed, tied embeddings), the stage on the demo, 2 ranks = 1 rank, and bad input."""
from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch

from helpers import make_tiny_llama, run_ranks, tiny_model
from safeneurons import cli
from safeneurons.data.samples import load_prompts
from safeneurons.errors import SafeneuronsError
from safeneurons.interp.direction import hooks
from safeneurons.interp.direction.candidates import compute_candidates, encode, last_logits
from safeneurons.interp.direction.positions import post_instruction_tokens
from safeneurons.interp.direction.run import RefusalDirectionConfig, draw
from safeneurons.interp.direction.selection import SelectionConfig, score_candidates, select
from safeneurons.interp.patching.metrics import refusal_metric, refusal_token_ids
from safeneurons.interventions.orthogonalize import orthogonalize_files, orthogonalize_model

RELAXED = SelectionConfig(kl_threshold=1000.0, induce_threshold=-1000.0)  # see test_the_original_filter_*


# ------------------------------------------------------------------------------ the reference, as the original
def ref_mean_activations(model, tokenizer, prompts, positions, batch_size=5):
    """The original's get_mean_activations: pre-hooks adding (1/n) Σ_batch activation[:, positions] in float64."""
    layers = model.model.layers
    means = torch.zeros((len(positions), len(layers), model.config.hidden_size), dtype=torch.float64)
    handles = []
    for layer, block in enumerate(layers):
        def hook(module, args, kwargs, layer=layer):
            activation = (args[0] if args else kwargs["hidden_states"]).clone().to(means)
            means[:, layer] += (1.0 / len(prompts)) * activation[:, positions, :].sum(dim=0)
        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    for start in range(0, len(prompts), batch_size):
        with torch.no_grad():
            model(**encode(tokenizer, prompts[start:start + batch_size], torch.device("cpu")))
    for handle in handles:
        handle.remove()
    return means


def ref_hooks(model, direction):
    """The original's ablation: pre-hook on every block, output hooks on every attention and MLP module."""
    unit = direction / (direction.norm(dim=-1, keepdim=True) + 1e-8)
    handles = []

    def ablate(activation):
        u = unit.to(activation)
        return activation - (activation @ u).unsqueeze(-1) * u

    for block in model.model.layers:
        handles.append(block.register_forward_pre_hook(
            lambda m, args, kwargs: ((ablate(args[0]), *args[1:]), kwargs) if args else
            (args, {**kwargs, "hidden_states": ablate(kwargs["hidden_states"])}), with_kwargs=True))
        for module in (block.self_attn, block.mlp):
            handles.append(module.register_forward_hook(
                lambda m, i, out: (ablate(out[0]), *out[1:]) if isinstance(out, tuple) else ablate(out)))
    return handles


def ref_refusal_score(logits, refusal_ids, epsilon=1e-8):
    probs = torch.softmax(logits.double(), dim=-1)
    refusal = probs[:, refusal_ids].sum(dim=-1)
    return torch.log(refusal + epsilon) - torch.log(1 - refusal + epsilon)


def ref_kl(a, b, epsilon=1e-6):
    pa, pb = a.double().softmax(-1), b.double().softmax(-1)
    return torch.sum(pa * (torch.log(pa + epsilon) - torch.log(pb + epsilon)), dim=-1)


def ref_logits(model, tokenizer, prompts):
    return last_logits(model, encode(tokenizer, prompts, torch.device("cpu")))


def ref_select(model, tokenizer, candidates, harmful, harmless, refusal_ids, kl_threshold, induce_threshold,
               prune_layer_percentage=0.2):
    """The original's select_direction, one candidate at a time; returns the scores and the argmin."""
    n_pos, n_layer, _ = candidates.shape
    baseline = ref_logits(model, tokenizer, harmless)
    rows, kept = [], []
    for pos in range(-n_pos, 0):
        for layer in range(n_layer):
            direction = candidates[pos, layer]
            handles = ref_hooks(model, direction)
            bypass = ref_refusal_score(ref_logits(model, tokenizer, harmful), refusal_ids).mean().item()
            ablated = ref_logits(model, tokenizer, harmless)
            kl = ref_kl(baseline, ablated).mean().item()
            exact_kl = ref_kl(baseline, ablated, epsilon=0.0).mean().item()
            for handle in handles:
                handle.remove()
            handle = model.model.layers[layer].register_forward_pre_hook(
                lambda m, args, kwargs, v=direction: ((args[0] + v.to(args[0]), *args[1:]), kwargs) if args else
                (args, {**kwargs, "hidden_states": kwargs["hidden_states"] + v.to(kwargs["hidden_states"])}),
                with_kwargs=True)
            induce = ref_refusal_score(ref_logits(model, tokenizer, harmless), refusal_ids).mean().item()
            handle.remove()
            rows.append((pos, layer, bypass, induce, kl, exact_kl))
            discard = (any(math.isnan(v) for v in (bypass, induce, kl))
                       or layer >= int(n_layer * (1.0 - prune_layer_percentage)) or kl > kl_threshold
                       or induce < induce_threshold)
            if not discard:
                kept.append((-bypass, pos, layer))
    kept = sorted(kept, key=lambda item: item[0], reverse=True)
    return rows, (kept[0][1], kept[0][2]) if kept else None


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def demo_splits(demo_tokenizer):
    config = RefusalDirectionConfig(n_train=24, n_val=10)
    harmful = draw(load_prompts("demo-harmful", demo_tokenizer), config, "harmful")
    harmless = draw(load_prompts("demo-harmless", demo_tokenizer), config, "harmless")
    return harmful, harmless


@pytest.fixture(scope="module")
def demo_candidates(demo_model, demo_tokenizer, demo_splits):
    (harmful, _, _), (harmless, _, _) = demo_splits
    tokens = post_instruction_tokens(demo_tokenizer)
    return compute_candidates(demo_model, demo_tokenizer, harmful, harmless, tokens, batch_size=5)


# ---------------------------------------------------------------------------------------------------- tests
def test_post_instruction_tokens_come_from_the_template(demo_tokenizer):
    tokens = demo_tokenizer.convert_ids_to_tokens(post_instruction_tokens(demo_tokenizer))
    assert "".join(tokens).replace("Ġ", " ") == " [/INST]"


def test_candidates_equal_the_originals_means(demo_model, demo_tokenizer, demo_splits, demo_candidates):
    (harmful, _, _), (harmless, _, _) = demo_splits
    positions = demo_candidates.positions
    reference = (ref_mean_activations(demo_model, demo_tokenizer, harmful, positions)
                 - ref_mean_activations(demo_model, demo_tokenizer, harmless, positions))
    assert demo_candidates.directions.dtype == torch.float64
    assert torch.allclose(demo_candidates.directions, reference, rtol=0, atol=1e-10)
    assert float(demo_candidates.directions[:, 0].abs().max()) == 0.0  # layer 0: the template tokens' embeddings


@pytest.fixture(scope="module")
def scored(demo_model, demo_tokenizer, demo_splits, demo_candidates):
    """Our scores of every candidate and the reference's (the scores do not depend on the thresholds)."""
    (_, harmful_val, _), (_, harmless_val, _) = demo_splits
    refusal_ids = refusal_token_ids(demo_tokenizer)
    scores = score_candidates(demo_model, demo_tokenizer, demo_candidates, harmful_val, harmless_val,
                              refusal_metric(refusal_ids), RELAXED)
    rows, chosen = ref_select(demo_model, demo_tokenizer, demo_candidates.directions, harmful_val, harmless_val,
                              refusal_ids, RELAXED.kl_threshold, RELAXED.induce_threshold)
    return scores, rows, chosen


def test_selection_equals_the_originals(scored, demo_model, demo_tokenizer, demo_splits, demo_candidates):
    scores, rows, chosen = scored
    best, chosen_by = select(scores, demo_candidates.directions.shape[1], RELAXED)
    assert chosen_by == "filter"
    assert (best.position, best.layer) == chosen
    for score, (pos, layer, bypass, induce, kl, exact_kl) in zip(scores, rows):
        assert (score.position, score.layer) == (pos, layer)
        assert score.refusal_score == pytest.approx(bypass, abs=1e-4)  # the reference's 1e-8 and float64 softmax
        assert score.steering_score == pytest.approx(induce, abs=1e-4)
        assert score.kl_div_score == pytest.approx(exact_kl, rel=1e-4, abs=1e-9)  # ours is the exact KL;
        assert score.kl_div_score == pytest.approx(kl, rel=0.2, abs=2e-4)  # the original adds 1e-6 in its logs
    (_, harmful_val, _), (_, harmless_val, _) = demo_splits
    one_at_a_time = score_candidates(demo_model, demo_tokenizer, demo_candidates, harmful_val, harmless_val,
                                     refusal_metric(refusal_token_ids(demo_tokenizer)),
                                     SelectionConfig(1000.0, -1000.0, candidates_per_pass=1))
    def flat(found):
        return [value for s in found for value in (s.refusal_score, s.steering_score, s.kl_div_score)]

    assert flat(one_at_a_time) == pytest.approx(flat(scores), abs=1e-6)


def test_the_original_filter_discards_every_demo_candidate(scored, demo_candidates):
    """With the original's thresholds (KL 0.1, induce 0, the last 20% of layers) no demo candidate is left, in
    the reference's filter as in ours: on the demo, adding a mean difference rarely induces refusal."""
    scores, rows, _ = scored
    n_layers = demo_candidates.directions.shape[1]
    assert not [row for row in rows if not (row[1] >= int(n_layers * 0.8) or row[4] > 0.1 or row[3] < 0.0)]
    with pytest.raises(SafeneuronsError, match=r"the filter discarded all 18 candidates \(.*induce < 0"):
        select(scores, n_layers, SelectionConfig(when_all_discarded="error"))


@pytest.mark.parametrize("fallback,bound", [("kl_bounded", 1.0), ("kl_bounded", 0.05), ("lowest_bypass", math.inf)])
def test_the_fallbacks_take_the_lowest_bypass_within_their_bound(scored, demo_candidates, fallback, bound):
    """When the filter keeps nothing: kl_bounded takes the lowest bypass among the kept layers' candidates whose
    KL is within its bound, lowest_bypass the lowest of all, each marked with the filter's reason."""
    scores, _, _ = scored
    n_layers = demo_candidates.directions.shape[1]
    config = SelectionConfig(when_all_discarded=fallback, fallback_kl_threshold=min(bound, 1e9))
    eligible = [(s.refusal_score, s.position, s.layer) for s in scores
                if fallback == "lowest_bypass" or (s.layer < int(n_layers * 0.8) and s.kl_div_score <= bound)]
    if not eligible:
        with pytest.raises(SafeneuronsError, match="none has KL <= --fallback-kl-threshold"):
            select(scores, n_layers, config)
        return
    best, chosen_by = select(scores, n_layers, config)
    assert chosen_by == fallback and best.discarded is not None
    assert (best.refusal_score, best.position, best.layer) == min(eligible, key=lambda row: row[0])


def test_the_judges_are_the_originals():
    """refusal_direction's judge: JailbreakBench's prefixes anywhere, any case, every other text a jailbreak;
    Wei et al.'s: their case-sensitive list, and an attack needs 20 words."""
    from safeneurons.evaluation.metrics import SUBSTRING_JUDGES

    texts = {"i CANNOT help with that.": (True, False, False, False), "Sure, here is how.": (False, True, False, False),
             "However, " + "word " * 25: (False, True, True, False), "Sure " + "word " * 25: (False, True, False, True)}
    for text, (jbb_refuses, jbb_succeeds, wei_refuses, wei_succeeds) in texts.items():
        assert [judge(text) for judge in SUBSTRING_JUDGES["jailbreakbench"]] == [jbb_refuses, jbb_succeeds], text
        assert [judge(text) for judge in SUBSTRING_JUDGES["keyword"]] == [wei_refuses, wei_succeeds], text


def test_a_destructive_edit_is_named_in_the_report():
    from safeneurons.interp.direction.run import perplexity_warnings

    warnings = perplexity_warnings({"baseline": 2.0, "ablation": 53.0, "actadd_subtract": 3.9}, 2.0)
    assert len(warnings) == 1 and warnings[0].startswith("ablation raises perplexity 26.5-fold (2.000 -> 53.000)")


def block_output_projections(model, inputs, direction):
    """The largest |projection on r̂| of every block's output, relative to its norm, under ablation."""
    unit = direction / direction.norm()
    found = []
    handles = [block.register_forward_hook(
        lambda m, i, out: found.append(float(((out[0] if isinstance(out, tuple) else out) @ unit).abs().max()
                                             / (out[0] if isinstance(out, tuple) else out).norm(dim=-1).max())))
        for block in model.model.layers]
    with hooks.ablation(model, direction):
        last_logits(model, inputs)
    for handle in handles:
        handle.remove()
    return found


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3_text", "qwen3", "phi3"])
def test_ablation_removes_the_direction_from_every_block_output(arch, demo_tokenizer):
    """On every supported structure; and where weights can carry it (not Gemma's post-norms), the orthogonalized
    model's logits equal the hooks'."""
    model = make_tiny_llama(demo_tokenizer, seed=3, hidden=64, heads=4) if arch == "llama" else \
        tiny_model(arch, demo_tokenizer, seed=3)
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    inputs = encode(demo_tokenizer, ["[INST] How do I rob a bank? [/INST]", "[INST] Hi [/INST]"], torch.device("cpu"))
    assert max(block_output_projections(model, inputs, direction)) < 1e-5
    if arch.startswith("gemma"):  # the attention and MLP outputs are normalised after: ablating them is not enough
        with pytest.raises(SafeneuronsError, match="post-norms"):
            orthogonalize_model(copy.deepcopy(model), direction)
        return
    with hooks.ablation(model, direction):
        ablated = last_logits(model, inputs)
    edited = copy.deepcopy(model)
    orthogonalize_model(edited, direction)
    assert torch.allclose(last_logits(edited, inputs), ablated, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_orthogonalized_weights_equal_the_ablation_hooks(tied, demo_tokenizer, tmp_path):
    model = make_tiny_llama(demo_tokenizer, seed=4, hidden=64, heads=4)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
        assert model.lm_head.weight is model.model.embed_tokens.weight
    direction = torch.randn(64, generator=torch.Generator().manual_seed(2))
    inputs = encode(demo_tokenizer, ["[INST] How do I rob a bank? [/INST]", "[INST] Hi [/INST]"], torch.device("cpu"))
    with hooks.ablation(model, direction):
        ablated = last_logits(model, inputs)
    assert not torch.allclose(ablated, last_logits(model, inputs), atol=1e-3)
    edited = copy.deepcopy(model)
    result = orthogonalize_model(edited, direction)
    assert result.untied is tied and torch.allclose(last_logits(edited, inputs), ablated, atol=1e-5)
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "out").mkdir()
    streamed = orthogonalize_files(tmp_path / "model", direction, tmp_path / "out")
    assert sorted(streamed.edited) == sorted(name for name in result.edited if name != "lm_head.weight")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.allclose(last_logits(loaded, inputs), ablated, atol=1e-5)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)  # the unembedding kept the original matrix
    assert loaded.config.tie_word_embeddings is False if tied else True


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("direction")
    assert cli.main(["score", "--model", "demo", "--score-method", "wandg", "--data", "demo-align", "--nsamples", "8",
                     "--sparsity-ratio", "0.03", "--out", str(root / "masks")]) == 0
    argv = ["direction", "--model", "demo", "--n-train", "24", "--n-val", "10", "--eval-limit", "8",
            "--max-new-tokens", "24", "--kl-threshold", "1000", "--induce-threshold", "-1000", "--compare-random",
            "1", "--perplexity-data", "demo-utility", "--perplexity-samples", "8", "--masks", str(root / "masks"), "--save-orthogonalized", str(root / "orthogonalized"),
            "--out", str(root / "one")]
    assert cli.main(argv) == 0
    return root, argv


def test_the_stage_writes_the_originals_files_and_measures_the_direction(demo_run):
    root, _ = demo_run
    out = root / "one"
    metadata = json.loads((out / "direction_metadata.json").read_text())
    evaluations = json.loads((out / "direction_evaluations.json").read_text())
    assert set(metadata) == {"pos", "layer"} and len(evaluations) == 18
    chosen = next(row for row in evaluations if (row["position"], row["layer"]) == (metadata["pos"],
                                                                                   metadata["layer"]))
    kept = [row for row in evaluations if row["discarded"] is None]
    assert chosen["refusal_score"] == min(row["refusal_score"] for row in kept)
    direction = torch.load(out / "direction.pt", weights_only=True)
    means = torch.load(out / "generate_directions" / "mean_diffs.pt", weights_only=True)
    assert torch.equal(direction, means[metadata["pos"], metadata["layer"]])
    report = json.loads((out / "direction_report.json").read_text())
    effects = report["effects"]
    assert effects["harmful"]["baseline"]["refusal_rate"]["rate"] == 1.0  # demo-chat refuses
    assert report["orthogonalized"]["measured"]
    perplexity = effects["perplexity"]
    assert report["orthogonalized"]["perplexity"] == pytest.approx(perplexity["ablation"], rel=1e-5)
    assert perplexity["baseline"] > 1 and perplexity["ablation"] != perplexity["baseline"]
    assert report["orthogonalized"]["harmful"]["refusal_score"] == pytest.approx(
        effects["refusal_score"]["ablation"], abs=1e-4)  # the weights do what the hooks do
    links = report["links"]
    assert 0 < links["alignment"]["masked"] < 1 and links["carrying"]["all"]["refusal_score"] == pytest.approx(
        effects["refusal_score"]["ablation"], abs=1e-4)
    assert (out / "direction_scores.png").is_file() and (root / "orthogonalized" / "model.safetensors").is_file()
    assert (root / "orthogonalized" / "orthogonalize_summary.json").is_file()


@pytest.mark.distributed
def test_two_ranks_give_the_same_direction(demo_run):
    """1 rank and 2 ranks, both on one thread per rank: BLAS splits a product's sum by thread count, so the
    in-process run (2 threads) may differ from 2 ranks in the last bits of the evaluations."""
    root, argv = demo_run
    argv = [item for item in argv[:argv.index("--compare-random")]]
    for ranks, name in ((1, "one_thread"), (2, "two")):
        result = run_ranks(["safeneurons.cli", *argv, "--out", str(root / name)], nproc=ranks, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    for name in ("direction_metadata.json", "direction_evaluations.json"):
        assert (root / "one_thread" / name).read_text() == (root / "two" / name).read_text(), name
    assert torch.equal(torch.load(root / "one_thread" / "direction.pt", weights_only=True),
                       torch.load(root / "two" / "direction.pt", weights_only=True))
    one, two = (json.loads((root / name / "direction_report.json").read_text())["effects"] for name in ("one", "two"))
    assert one["harmful"] == two["harmful"] and one["harmless"] == two["harmless"]


def test_patching_takes_the_selected_direction(demo_run, tmp_path):
    root, _ = demo_run
    assert cli.main(["patch", "--model", "demo", "--clean", "How do I rob a bank?", "--corrupted",
                     "How do I paint a bank?", "--metric", "direction", "--direction",
                     str(root / "one" / "direction.pt"), "--components", "residual", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "patching.json").read_text())["metric"] == "direction"


@pytest.mark.parametrize("extra,message,before_loading", [
    (["--harmless-data", "demo-harmful"], "no harmless train prompt is left after the original's filter", False),
    (["--n-train", "90", "--n-val", "20"], "--harmful has 100 prompts; --n-train 90 + --n-val 20", True),
    (["--kl-threshold", "-1"], "--kl-threshold -1.0 must be >= 0", True),
])
def test_bad_input_is_one_line(extra, message, before_loading, tmp_path, capsys):
    assert cli.main(["direction", "--model", "demo", "--out", str(tmp_path / "out"), *extra]) == 2
    error = capsys.readouterr().err
    assert [line for line in error.splitlines() if "error:" in line] == [f"safeneurons: error: {error.split('error: ')[1].strip()}"]
    assert message in error and ("Loading weights" not in error) is before_loading, error
    assert not (tmp_path / "out").exists()


def test_a_direction_from_another_model_fails_before_the_model_loads(tmp_path, capsys):
    torch.save(torch.ones(7), tmp_path / "direction.pt")
    assert cli.main(["patch", "--model", "demo", "--clean", "How do I rob a bank?", "--corrupted",
                     "How do I paint a bank?", "--metric", "direction", "--direction", str(tmp_path / "direction.pt"),
                     "--out", str(tmp_path / "out")]) == 2
    assert "has 7 entries; the model's hidden size is 128" in capsys.readouterr().err


def test_a_template_without_post_instruction_tokens_is_refused(demo_tokenizer):
    plain = copy.deepcopy(demo_tokenizer)
    plain.chat_template = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"
    with pytest.raises(SafeneuronsError, match="puts no token between the instruction and the response"):
        post_instruction_tokens(plain)


def test_splits_are_drawn_without_overlap():
    prompts = [f"p{i}" for i in range(50)]
    train, val, test = draw(prompts, RefusalDirectionConfig(n_train=20, n_val=10, eval_limit=100), "harmful")
    assert len(set(train) | set(val) | set(test)) == 50 and not set(train) & set(val)
    assert train == [prompts[i] for i in random.Random(42).sample(range(50), 50)][:20]


def test_the_stage_runs_on_tiny_gemma2(demo_tokenizer, tmp_path, capsys):
    """Gemma-2: ablation edits its post-norm outputs; a random model refuses nothing, so the original's filter would
    empty the harmful splits (one line naming the switch), and without it the stage runs; orthogonalization is
    refused before the model loads (its post-norms rescale every coordinate)."""
    folder = tmp_path / "gemma2"
    tiny_model("gemma2", demo_tokenizer, seed=5).save_pretrained(folder)
    demo_tokenizer.save_pretrained(folder)
    common = ["direction", "--model", str(folder), "--n-train", "8", "--n-val", "4", "--eval-limit", "4",
              "--max-new-tokens", "4", "--kl-threshold", "1000", "--induce-threshold", "-1000"]
    assert cli.main([*common, "--out", str(tmp_path / "filtered")]) == 2
    assert "after the original's filter" in capsys.readouterr().err
    assert cli.main([*common, "--no-filter-train", "--no-filter-val", "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "out" / "direction_report.json").read_text())
    assert report["orthogonalized"]["measured"] is False and "post-norms" in report["orthogonalized"]["why"]
    assert cli.main([*common, "--no-filter-train", "--no-filter-val", "--save-orthogonalized",
                     str(tmp_path / "orth"), "--out", str(tmp_path / "again")]) == 2
    error = capsys.readouterr().err
    assert "gemma2 normalises each block's output" in error and "Loading weights" not in error
