"""`safeneurons plan`: model sizes, DeepSpeed's estimates, the activation formula, masks, the fit verdicts, and each
stage's figure against the measured peak memory of the real code."""
from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import PEAK_ENV, PEAK_OF, REPO, make_tiny_llama, measure_peak, run_ranks
from safeneurons import cli
from safeneurons.models.structure import scored_linears
from safeneurons.workflows.plan import (GIB, Cluster, Workload, activation_bytes_per_token,
                                        kv_cache_bytes as kv_cache_bytes_of, plan_report, plan_stages,
                                        sequence_forward_bytes, training_activations)
from safeneurons.workflows.plan_model import PRESETS, ModelShape, model_shape


def _llama(shape: ModelShape, dtype: torch.dtype = torch.float32, device: str = "cpu", attention: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, tie_word_embeddings=shape.tied_embeddings,
                         max_position_embeddings=4096)
    config._attn_implementation = attention
    with torch.device(device):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).to(dtype)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_sizes_match_the_transformers_model(name: str) -> None:
    shape = PRESETS[name]
    model = _llama(shape, device="meta")
    assert shape.total_params == sum(param.numel() for param in model.parameters())
    assert shape.largest_param == max(param.numel() for param in model.parameters())
    assert shape.scored_params == sum(item.module.weight.numel() for item in scored_linears(model))


def test_llama2_7b_has_its_published_parameter_count() -> None:
    assert model_shape("llama2-7b-chat-hf").total_params == 6_738_415_616
    assert model_shape("meta-llama/Llama-2-70b-hf") is PRESETS["llama2-70b"]


def test_a_local_folder_is_read_from_its_config(demo_model) -> None:
    shape = model_shape("demo")
    assert shape.total_params == sum(param.numel() for param in demo_model.parameters())
    assert shape.scored_params == sum(item.module.weight.numel() for item in scored_linears(demo_model))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_activation_formula_equals_the_tensors_autograd_saves(attention: str) -> None:
    """A shape outside the fit (grouped-query attention, odd widths, other batch and length): the bytes saved
    for backward, counted once per storage and without parameters, match the formula, with SDPA and with eager
    attention (its scores grow with the length). The formula is per token; the few tensors that do not grow with
    the batch (RoPE tables [1, length, head_dim], the scalar loss) were folded into its constants for the fitted
    batch and length, which leaves well under 0.5% here."""
    shape = ModelShape("probe", hidden=80, layers=3, intermediate=176, heads=5, kv_heads=1, vocab=150,
                       eager_attention=attention == "eager")
    model = _llama(shape, torch.bfloat16, attention=attention).train()
    parameters = {param.untyped_storage().data_ptr() for param in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    batch, length = 3, 20
    ids = torch.randint(0, shape.vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    assert sum(saved.values()) == pytest.approx(training_activations(shape, batch, length), rel=5e-3)

    # activation checkpointing: the forward keeps each layer's input; the backward recomputes one layer at a time
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    per_layer, _ = activation_bytes_per_token(shape, length)
    stored = training_activations(shape, batch, length, checkpointing=True) - batch * length * per_layer
    assert sum(saved.values()) == pytest.approx(stored, rel=0.03)


def test_finetune_states_are_deepspeeds_zero3_estimate() -> None:
    """ZeRO-3 without offload: 18 bytes per parameter over all GPUs plus the largest layer (params + grads in
    16 bit); with parameter offload only the largest layer stays; optimizer offload keeps the 16-bit params. The
    optimizer step's 8 bytes per parameter stay on the GPU only without offload; the host keeps finetune's bf16
    copy of the weights beside DeepSpeed's CPU figure."""
    shape = PRESETS["llama2-70b"]
    largest = 4 * shape.largest_param
    by_offload = {offload: plan_stages(shape, Cluster(4, 8, offload=offload), Workload())[1]
                  for offload in ("none", "optimizer", "param")}
    assert by_offload["none"].model_states == largest + int(18 * shape.total_params / 32)
    assert by_offload["optimizer"].model_states == largest + int(2 * shape.total_params / 32)
    assert by_offload["param"].model_states == largest
    start_copy = 2 * shape.total_params // 4
    assert by_offload["param"].cpu_per_node == int(shape.total_params * 18 / 4 * 1.5) + start_copy
    assert by_offload["none"].optimizer_step == 8 * shape.total_params // 32
    assert by_offload["optimizer"].optimizer_step == by_offload["param"].optimizer_step == 0


def test_masks_scores_and_activations_per_gpu() -> None:
    shape, cluster, workload = PRESETS["llama2-70b"], Cluster(1, 8), Workload(batch_size=2, max_length=256)
    score, finetune, patch, _circuit, trace, evaluation = plan_stages(shape, cluster, workload)
    assert score.masks == math.ceil(shape.scored_params / 64)  # one bit per weight, an eighth of the ranks
    assert finetune.masks == score.masks + math.ceil(workload.sparsity_ratio * shape.scored_params * 4 / 8)
    assert workload.sparsity_ratio == 0.1  # the one default of score, pipeline and plan
    assert finetune.scores == patch.scores == trace.scores == 0
    # wandg, one sample at a time: the larger of what the forward saves and, at the end of the backward, every
    # scored Linear's bf16 input (4 per layer: 8192, 8192, 8192, 28672) and output gradient (q 8192, k/v 1024,
    # o 8192, gate/up 28672, down 8192); the forward's figure gains the loss backward's logit gradients
    # (10 bytes per vocabulary entry and token, LOSS_BACKWARD_LOGIT_BYTES) as the backward starts
    outside = activation_bytes_per_token(shape, 256)[1]
    after = 2 * 80 * (3 * 8192 + 28672 + 8192 + 2 * 1024 + 8192 + 2 * 28672 + 8192) + outside
    assert score.activations == max(training_activations(shape, 1, 256) + 256 * 10 * 32000, 256 * after)
    assert finetune.activations == training_activations(shape, 2, 256)
    assert trace.model_states == patch.model_states  # one model at a time
    cost = 3.1 * shape.intermediate ** 2 * 8  # the float64 cost matrix and its temporaries, measured
    assert trace.total == max(trace.model_states + 2 * sequence_forward_bytes(shape, 256), int(cost))
    assert int(cost) / GIB == pytest.approx(19.0, abs=0.1)  # at I = 28672 (the issue's ≈ 18 GiB with 3 copies)


def test_score_sums_in_one_round_or_in_rounds_beside_the_owned_sums() -> None:
    """All sums of |gradient| on every rank when they fit --score-memory; else the owned eighth (fp32) stays and the
    rest of the budget holds one round of accumulators (8 bytes a weight fixed, 16 exact, 4 float32)."""
    shape, cluster = PRESETS["llama2-70b"], Cluster(1, 8)
    for accumulate, size in (("fixed", 8), ("exact", 16), ("float32", 4)):
        everything = size * shape.scored_params
        one = plan_stages(shape, cluster, Workload(score_memory=everything, accumulate_dtype=accumulate))[0]
        assert one.scores == everything
        budget = 40 * GIB
        score = plan_stages(shape, cluster, Workload(score_memory=budget, accumulate_dtype=accumulate))[0]
        assert score.scores == budget  # owned (fp32 sums / 8) + one round of budget − owned
        report = plan_report(shape, cluster, Workload(score_memory=budget, accumulate_dtype=accumulate))
        owned = 4 * shape.scored_params // 8
        assert report["score_sums"]["rounds"] == math.ceil(everything / (budget - owned)), accumulate


def test_plan_rounds_are_the_rounds_scoring_runs(demo_tokenizer) -> None:
    """plan's rounds for a budget against `scoring.accumulation_rounds` on the same model's Linears (2 ranks)."""
    from safeneurons.scores.config import Target
    from safeneurons.scores.statistics import accumulation_rounds, accumulator_bytes
    from safeneurons.workflows.plan import score_sums

    model = make_tiny_llama(demo_tokenizer, hidden=64, intermediate=160, layers=4)
    targets = [Target(index, linear, linear.layer % 2) for index, linear in enumerate(scored_linears(model))]
    shape = ModelShape("tiny", hidden=64, layers=4, intermediate=160, heads=4, kv_heads=4, vocab=len(demo_tokenizer))
    everything = accumulator_bytes(targets, 16)
    assert 16 * shape.scored_params == everything
    for budget in (everything, everything // 2 + everything // 4, everything // 2 + everything // 8):
        planned = score_sums(shape, Cluster(1, 2), budget, 16)
        rounds = accumulation_rounds(targets, budget, 16)
        assert planned.rounds <= len(rounds) <= 2 * planned.rounds, budget  # whole Linears per round
        owned = accumulator_bytes(targets, 4) // 2  # finished sums are fp32, half of them on each rank
        held = max(accumulator_bytes(group, 16) for group in rounds) + (0 if len(rounds) == 1 else owned)
        assert held <= planned.peak, budget


def test_layer_sharded_scoring_partitions_llama2_70b_over_its_gpus() -> None:
    """Every parameter and every wandg sum on exactly one of the 8 GPUs (the untied head on the last), every
    stage within 2 layers of the others, and far fewer passes than data-parallel scoring's rounds."""
    from safeneurons.workflows.plan import BF16_BYTES, sharded_inputs
    from safeneurons.workflows.plan_layers import sharded_score_stages

    shape, cluster = PRESETS["llama2-70b"], Cluster(1, 8)
    stages = sharded_score_stages(sharded_inputs(shape, cluster, Workload()))
    assert [stage.layers.start for stage in stages] + [stages[-1].layers.stop] == list(range(0, 81, 10))
    assert sum(stage.weights for stage in stages) == BF16_BYTES * shape.total_params
    assert sum(stage.sums for stage in stages) == 8 * shape.scored_params  # fixed-point sums: 8 bytes a weight
    report = plan_report(shape, cluster, Workload())
    assert report["score_layer_sharded"]["passes"] < report["score_sums"]["rounds"] / 10
    # sharded eval: the same blocks; its caches and working set grow with the prompts per batch, linearly
    evaluation = [plan_report(shape, cluster, Workload(eval_batch_size=batch))["eval_layer_sharded"]["largest_gib"]
                  for batch in (8, 16)]
    assert evaluation[0]["weights"] in {stage.weights / GIB for stage in stages}
    assert evaluation[1]["caches_and_activations"] == pytest.approx(2 * evaluation[0]["caches_and_activations"])


def test_fit_verdicts_for_llama2_70b() -> None:
    shape = PRESETS["llama2-70b"]

    def fits(nodes: int, offload: str = "none", batch: int = 4) -> dict[str, bool]:
        report = plan_report(shape, Cluster(nodes, 8, 80.0, offload), Workload(batch_size=batch))
        return {stage["stage"]: stage["fits"] for stage in report["stages"]}

    # score fits one node only by holding one Linear's sums per round beside its owned eighth (~290 rounds); circuit
    # holds the whole model on every rank (138 GB in bf16), so no number of nodes makes it fit
    assert fits(1) == {"score": True, "finetune": False, "patch": True, "circuit": False, "trace": True, "eval": True}
    assert not fits(8)["circuit"]
    # layer-sharded, each stage holds its layers and a row carries every node's difference from below: one row
    # per pass fits 8 GPUs, the default 16 do not
    sharded = {batch: plan_report(shape, Cluster(1, 8), Workload(patch_batch_size=batch))["circuit_layer_sharded"]
               for batch in (1, None)}
    assert sharded[1]["fits"] and not sharded[None]["fits"]
    assert sharded[None]["largest_gib"]["working"] > 10 * sharded[1]["largest_gib"]["working"]
    rounds = {(nodes, accumulate): plan_report(shape, Cluster(nodes, 8), Workload(accumulate_dtype=accumulate))[
        "score_sums"]["rounds"] for nodes in (1, 4) for accumulate in ("exact", "float32")}
    assert rounds[1, "exact"] == rounds[1, "float32"] > 200  # one Linear a round either way
    assert 30 < rounds[4, "exact"] < 60 and rounds[4, "float32"] < 30  # exact accumulators are 4x fp32's
    assert fits(4)["finetune"] is False and fits(4, batch=1)["finetune"] is True
    assert fits(1, "param", batch=1)["finetune"] is True
    assert all(fit for stage, fit in fits(4, batch=1).items() if stage != "circuit")


def test_plan_command_prints_json_and_exits_1_when_a_stage_does_not_fit(capsys, tmp_path) -> None:
    argv = ["plan", "--model", "llama2-7b", "--nodes", "1", "--gpus-per-node", "8", "--json", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "plan.json").read_text()) == report
    assert [stage["stage"] for stage in report["stages"]] == ["score", "finetune", "patch", "circuit", "trace", "eval"]
    assert report["cluster"]["world_size"] == 8
    assert cli.main(["plan", "--model", "llama2-70b", "--nodes", "1", "--gpus_per_node", "8"]) == 1
    table = capsys.readouterr().out
    assert "finetune" in table and "NO" in table
    finetune_row = next(line for line in table.splitlines() if line.startswith("finetune"))
    expected = plan_stages(PRESETS["llama2-70b"], Cluster(1, 8), Workload())[1].total / GIB
    assert f"{expected:.2f}" in finetune_row


@pytest.mark.parametrize("argv, message", [
    (["--model", "llama9-1b"], "neither a known size"),
    (["--model", "llama2-7b", "--nodes", "0"], "--nodes is 0"),
    (["--model", "llama2-7b", "--sparsity-ratio", "1.5"], "--sparsity-ratio is 1.5"),
])
def test_bad_input_gives_one_clear_error(argv: list[str], message: str, capsys) -> None:
    assert cli.main(["plan", *argv]) == 2
    assert message in capsys.readouterr().err


def test_an_output_that_is_a_file_fails_before_the_plan_is_printed(tmp_path, capsys) -> None:
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    assert cli.main(["plan", "--model", "llama2-7b", "--json", "--out", str(taken)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and "existing file" in captured.err
    assert taken.read_text() == "keep me"


def test_kv_cache_formula_equals_the_cache_generation_keeps() -> None:
    """Grouped-query attention, bf16: the keys and values a generation's cache holds, byte for byte."""
    from safeneurons.workflows.plan import kv_cache_bytes

    shape = ModelShape("probe", hidden=80, layers=3, intermediate=176, heads=5, kv_heads=1, vocab=150)
    model = _llama(shape, torch.bfloat16)
    ids = torch.randint(3, shape.vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                         do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    cache = out.past_key_values
    held = sum(tensor.numel() * tensor.element_size() for layer in cache.layers for tensor in (layer.keys, layer.values))
    assert held == kv_cache_bytes(shape, 2, 7 + 5 - 1)  # the last new token's keys are never computed


def test_eval_stage_of_llama2_70b() -> None:
    shape, cluster = PRESETS["llama2-70b"], Cluster(1, 8)
    evaluation = plan_stages(shape, cluster, Workload())[5]
    assert evaluation.stage == "eval" and evaluation.masks == evaluation.scores == 0
    assert evaluation.activations >= kv_cache_bytes_of(shape, 16, 512 + 256)


def test_a_stage_that_does_not_fit_says_what_would_make_it_fit() -> None:
    shape, cluster = PRESETS["llama2-70b"], Cluster(1, 8)
    report = plan_report(shape, cluster, Workload())
    assert set(report["remedies"]) == {stage["stage"] for stage in report["stages"] if not stage["fits"]}
    finetune = {option["change"]: option for option in report["remedies"]["finetune"]}
    # each remedy's figure is the plan of the changed cluster or workload
    expected = plan_stages(shape, Cluster(1, 8, offload="param"), Workload())[1].total / GIB
    assert finetune["--offload param"]["gib_per_gpu"] == pytest.approx(expected, abs=0.01)
    assert list(finetune) == ["--offload param"] and finetune["--offload param"]["fits"]  # alone, only this
    assert "score" not in report["remedies"]  # it fits, in many rounds (test_fit_verdicts_for_llama2_70b)
    tight = plan_report(shape, Cluster(1, 2), Workload())["remedies"]["finetune"]
    assert len(tight) == 1 and not tight[0]["fits"]  # nothing alone fits 70B fine-tuning on 2 GPUs: the closest


MEASURE_COST_MATRIX = """
import sys, torch
from safeneurons.tracing import match_wmats

size = int(sys.argv[1])
generator = torch.Generator().manual_seed(0)
a, b = torch.randn(size, 64, generator=generator), torch.randn(size, 64, generator=generator)
match_wmats(a[:8], b[:8])  # the code paths warm, so the next peak is the matching's own
print("PEAK", peak_of(lambda: match_wmats(a, b)))
"""


@pytest.mark.parametrize("neurons", [1024, 2048])
def test_trace_cost_matrix_figure_equals_the_measured_peak(neurons) -> None:
    """The real matching (float64 distances, the assignment solver) in a fresh process: its peak resident memory
    above what the process held just before (Linux's VmHWM, reset through clear_refs) is plan's 3.1 × I² × 8
    bytes within 15%."""
    from safeneurons.workflows.plan import COST_MATRIX_COPIES

    measured, = measure_peak(MEASURE_COST_MATRIX, neurons)
    assert measured == pytest.approx(COST_MATRIX_COPIES * neurons ** 2 * 8, rel=0.15)


MEASURE_SCORE_PASSES = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from safeneurons.data import IGNORE_INDEX, Sample
from safeneurons.scoring import ScoreConfig, collect_statistics, targets_of

hidden, layers, intermediate, heads, vocab, tokens = (int(value) for value in sys.argv[1:])
config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=False,
                     max_position_embeddings=tokens, attn_implementation="sdpa")
torch.manual_seed(0)
model = LlamaForCausalLM(config).to(torch.bfloat16)
ids = torch.randint(0, vocab, (tokens,))
labels = ids.clone()
labels[:8] = IGNORE_INDEX
sample = Sample(ids, labels)
score = ScoreConfig(method="wandg", data="unused", sparsity_ratio=0.1, nsamples=1, score_memory=2 ** 40)
targets = targets_of(model)
collect_statistics(model, targets, [sample], score)  # warm-up: the allocator's and kernels' first use
print("PEAK", peak_of(lambda: collect_statistics(model, targets, [sample], score)))
"""


@pytest.mark.parametrize("tokens, vocab", [(128, 714), (256, 714)])
def test_score_figure_equals_the_measured_peak_of_the_passes(tokens, vocab) -> None:
    """wandg's passes in bf16 on a 12M-scored-weight Llama in a fresh process: the peak resident memory above what
    the process held before (VmHWM reset through clear_refs) is plan's scores (the fp32 sums, one round) plus
    activations (`score_pass_activations`) within 15%. A large vocabulary's logit gradients count: the real
    tier measures them on SmolLM2's 49,152 entries (tests/real)."""
    from safeneurons.workflows.plan import score_stage

    dims = dict(hidden=512, layers=4, intermediate=1376, heads=8, vocab=vocab)
    measured, = measure_peak(MEASURE_SCORE_PASSES, *dims.values(), tokens)
    shape = ModelShape("probe", kv_heads=dims["heads"], **dims)
    stage, _ = score_stage(shape, Cluster(1, 1), Workload(max_length=tokens, score_memory=2 ** 40))
    assert measured == pytest.approx(stage.scores + stage.activations, rel=0.15)


MEASURE_PATCH_SWEEP = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from safeneurons.patching import build_sites, patch_sweep

hidden, layers, intermediate, heads, vocab, tokens, batch = (int(value) for value in sys.argv[1:8])
config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=tokens,
                     attn_implementation=sys.argv[8])
torch.manual_seed(0)
model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
generator = torch.Generator().manual_seed(0)
clean, corrupted = (torch.randint(0, vocab, (1, tokens), generator=generator) for _ in range(2))
# every component, two positions: 2 × (3 + heads) sites per layer, so the batches of one layer are full
sites = build_sites(layers, heads, ["residual", "attn_out", "mlp_out", "attn_head"], None, [-1, -2])
sweep = lambda: patch_sweep(model, clean, corrupted, sites, metric_fn=lambda logits: logits[:, 1] - logits[:, 2],
                            batch_size=batch)
sweep()  # warm-up: the kernels' first use of each batch shape allocates workspaces that stay
print("PEAK", peak_of(sweep))
"""


@pytest.mark.parametrize("tokens, attention", [(128, "sdpa"), (256, "eager")])
def test_patch_figure_equals_the_measured_peak_of_a_sweep(tokens, attention) -> None:
    """An exact sweep over every component in bf16 (16 patched rows per forward) in a fresh process: the peak
    resident memory above what the process held before is plan's patch activations — the base run's layer
    inputs, the source run's activations, one batch of rows — within 15%, with SDPA and with eager attention
    (whose scores dominate at 256 tokens)."""
    from safeneurons.workflows.plan import patch_stage

    dims = dict(hidden=384, layers=2, intermediate=1024, heads=6, vocab=714)
    measured, = measure_peak(MEASURE_PATCH_SWEEP, *dims.values(), tokens, 16, attention)
    shape = ModelShape("probe", kv_heads=dims["heads"], eager_attention=attention == "eager", **dims)
    stage = patch_stage(shape, Cluster(1, 1), Workload(patch_length=tokens, patch_batch_size=16))
    assert measured == pytest.approx(stage.activations, rel=0.15)


MEASURE_FINE_TUNING = """
import dataclasses, gc, sys
from pathlib import Path
from safeneurons.finetune import FineTuneConfig, fine_tune

root, batch, tokens = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
config = FineTuneConfig(data=str(root / "data.json"), save_path=str(root / "warm-up"), num_epochs=1,
                        batch_size=batch, max_length=tokens, nsamples=batch, dtype="bfloat16", learning_rate=1e-4,
                        deepspeed=sys.argv[4])
model, masks = str(root / "model"), str(root / "masks" / "masks.safetensors")
fine_tune(model, masks, config)  # warm-up: imports, kernels, DeepSpeed's op and process group stay
gc.collect()
print("PEAK", peak_of(lambda: fine_tune(model, masks, dataclasses.replace(config, save_path=str(root / "measured"),
                                                                        nsamples=2 * batch))))
"""


@pytest.fixture(scope="module")
def measured_finetune_inputs(tmp_path_factory, demo_tokenizer):
    """A 7.6M-parameter Llama saved in a folder, 10% masks on every projection, long samples (all truncated)."""
    from safeneurons.masks.io import save_masks

    root = tmp_path_factory.mktemp("finetune-memory")
    model = make_tiny_llama(demo_tokenizer, layers=4, hidden=384, intermediate=1024, heads=6)
    model.config.max_position_embeddings = 512
    model.save_pretrained(root / "model")
    demo_tokenizer.save_pretrained(root / "model")
    generator = torch.Generator().manual_seed(0)
    save_masks({name: torch.rand(param.shape, generator=generator) < 0.1
                for name, param in model.named_parameters() if "proj" in name}, root / "masks")
    words = "the quick brown fox jumps over the lazy dog and then runs far away into the forest".split()
    records = [{"prompt": " ".join(words[index % 5:index % 5 + 4]), "response": " ".join(words * 60)}
               for index in range(16)]
    (root / "data.json").write_text(json.dumps(records))
    return root


@pytest.mark.slow
def test_finetune_figure_equals_the_measured_peak_of_the_stage(measured_finetune_inputs, tmp_path) -> None:
    """The whole `finetune` stage — load, freeze, DeepSpeed ZeRO-3 (bf16, one rank), two optimizer steps, the change
    report, the save — in a fresh process after a warm-up run: its peak resident memory above what the process held
    before is plan's total (model states, masks, the larger of the activations and the optimizer step) plus the
    host copy of the weights finetune keeps, within 15%. One sample of 128 tokens peaks in the optimizer step (a
    figure without the step would be 18% low); the activations' own formula is checked against the tensors
    autograd saves (test_activation_formula_equals_the_tensors_autograd_saves)."""
    from safeneurons.workflows.plan import BF16_BYTES, finetune_stage

    batch, tokens, root = 1, 128, measured_finetune_inputs
    (tmp_path / "measure_finetune.py").write_text(PEAK_OF + MEASURE_FINE_TUNING)
    config = str(REPO / "ds_configs" / "zero3.json")
    result = run_ranks(["measure_finetune", str(root), str(batch), str(tokens), config], nproc=1,
                       env={"PYTHONPATH": str(tmp_path), **PEAK_ENV})
    assert result.returncode == 0, result.stderr[-3000:]
    measured = int(result.stdout.split("PEAK ", 1)[1].split()[0])
    shape = model_shape(str(root / "model"))
    stage = finetune_stage(shape, Cluster(1, 1), Workload(batch_size=batch, max_length=tokens))
    assert stage.optimizer_step > stage.activations
    assert measured == pytest.approx(stage.total + BF16_BYTES * shape.total_params, rel=0.15)


MEASURE_EVALUATION = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from safeneurons.data import Sample
from safeneurons.evaluate import Decoding, generate, negative_log_likelihood
from safeneurons.models import load_tokenizer

moment, vocab, batch, repeats, new_tokens = sys.argv[1], *(int(value) for value in sys.argv[2:6])
config = LlamaConfig(vocab_size=vocab, hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                     num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=1024)
torch.manual_seed(0)
model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
tokenizer = load_tokenizer("demo")
prompts = ["the quick brown fox jumps over the lazy dog " * repeats] * batch  # one length, no padding
length = len(tokenizer(prompts[0])["input_ids"])
ids = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
samples = [Sample(row, row.clone()) for row in ids]
decoding = Decoding(max_new_tokens=new_tokens)
run = {"generate": lambda: generate(model, tokenizer, prompts, decoding, batch_size=batch),
       "perplexity": lambda: negative_log_likelihood(model, samples, 0, batch_size=batch)}[moment]
run()  # warm-up: the kernels' first use of each shape
print("PEAK", peak_of(run), length)
"""


@pytest.mark.parametrize("moment, vocab, batch, repeats, new_tokens", [
    ("generate", 714, 16, 3, 32),  # the prefill decides: the prompts' cache and the forward's working set
    ("generate", 714, 8, 1, 192),  # the last new token decides: the whole cache
    ("perplexity", 8000, 8, 5, 1),  # the full logits decide
])
def test_eval_figure_equals_the_measured_peak_of_each_moment(moment, vocab, batch, repeats, new_tokens) -> None:
    """Greedy generation through `evaluate.generate` (demo tokenizer, prompts of one length) and a perplexity batch
    through `evaluate.negative_log_likelihood`, bf16, in a fresh process: the peak resident memory above what the
    process held before is plan's eval activations (the largest of the three moments) within 15%, for a shape
    where each moment is the largest."""
    from safeneurons.workflows.plan import eval_stage, kv_cache_bytes, sequence_forward_bytes

    measured, length = measure_peak(MEASURE_EVALUATION, moment, vocab, batch, repeats, new_tokens)
    shape = ModelShape("probe", hidden=384, layers=4, intermediate=1024, heads=6, kv_heads=6, vocab=vocab)
    workload = Workload(eval_batch_size=batch, max_length=length, max_new_tokens=new_tokens)
    prefill = kv_cache_bytes(shape, batch, length) + batch * sequence_forward_bytes(shape, length)
    last_token = kv_cache_bytes(shape, batch, length + new_tokens - 1) * (1 + 1 / 8)  # one layer's K twice
    largest = {"prefill": prefill, "last token": last_token, "perplexity": 12 * vocab * batch * length}
    expected = {(714, 16): "prefill", (714, 8): "last token", (8000, 8): "perplexity"}[vocab, batch]
    assert max(largest, key=largest.get) == expected
    assert measured == pytest.approx(eval_stage(shape, Cluster(1, 1), workload).activations, rel=0.15)


def test_plan_parses_and_helps_without_torch():
    """`plan` is arithmetic: its options and --help load no torch (DeepSpeed's estimator does, when it runs)."""
    import subprocess
    import sys

    code = ("import sys\nfrom safeneurons.cli.app import main\ntry:\n    main(['plan', '--help'])\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "False", done.stderr[-2000:]


def test_the_sharded_line_says_what_one_round_holds():
    """At 70B on 8 × 80 GB the largest stage holds one round of its sums, not all of them: the line's sum adds up."""
    import re

    from safeneurons.workflows.plan import PlanConfig, format_table, run_plan

    line = next(text for text in format_table(run_plan(PlanConfig("llama2-70b", Cluster(1, 8, 80.0), Workload()))).splitlines()
                if text.startswith("score --shard layers"))
    total, weights, activations, held, every, rounds = map(float, re.search(
        r"largest stage ([\d.]+) GiB = weights ([\d.]+) \+ activations ([\d.]+) \+ one round's wandg fixed sums "
        r"([\d.]+) GiB \(of ([\d.]+) GiB in all, in (\d+) rounds\)", line).groups())
    assert abs(weights + activations + held - total) <= 0.15 and every > total and rounds > 1
