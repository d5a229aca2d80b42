"""Sums of per-sample statistics: exact sums are the same bit for bit in any order, grouping (ranks) and batch size;
`--accumulate-dtype model` sums in the model's dtype as the original code does."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import RATIO, TINY_SAMPLES, layer_linears, make_tiny_llama, reference_statistics
from safeneurons import SafeneuronsError
from safeneurons.data.samples import load_samples
from safeneurons.scores.accumulators import ExactSum, RunningSum
from safeneurons.scores.config import ScoreConfig
from safeneurons.scores.schedules import score_model

CPU = torch.device("cpu")


def wide_range_terms(count: int, shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    """Non-negative fp32 terms over 2^-30..2^20, where fp32 running sums lose bits in an order-dependent way."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=generator) * 2.0 ** torch.randint(-30, 20, shape, generator=generator)
            for _ in range(count)]


def grouped_exact_sum(terms: list[torch.Tensor], groups: int) -> torch.Tensor:
    """The terms dealt round-robin to `groups` accumulators (as ranks), whose words are then added (as the reduce)."""
    parts = [ExactSum(terms[0].shape, CPU) for _ in range(groups)]
    for index, term in enumerate(terms):
        parts[index % groups].add(term)
    total = parts[0]
    for part in parts[1:]:
        for mine, theirs in zip(total.tensors(), part.tensors()):
            mine += theirs
    return total.value("w")


def test_exact_sums_are_the_correctly_rounded_sum_in_any_order_and_grouping():
    terms = wide_range_terms(3000, (4, 5))  # > 2^11 terms: the low word is carried on the way
    reference = torch.tensor([[math.fsum(float(term[i, j]) for term in terms) for j in range(5)] for i in range(4)],
                             dtype=torch.float64).float()
    shuffled = [terms[i] for i in torch.randperm(len(terms), generator=torch.Generator().manual_seed(1))]
    for ordered, groups in ((terms, 1), (shuffled, 1), (terms, 2), (shuffled, 7)):
        assert torch.equal(grouped_exact_sum(ordered, groups), reference), groups


def test_running_float32_sums_depend_on_the_order():
    """The property the exact sums exist for: fp32 running sums of the same terms differ in their last bits."""
    terms = wide_range_terms(3000, (4, 5))
    sums = []
    for ordered in (terms, terms[::-1]):
        running = RunningSum((4, 5), CPU, torch.float32)
        for term in ordered:
            running.add(term)
        sums.append(running.value("w"))
    assert not torch.equal(*sums)


def test_a_non_finite_term_gives_nan_and_a_huge_term_an_error():
    nan_sum = ExactSum(3, CPU)
    nan_sum.add(torch.tensor([1.0, float("inf"), 2.0]))
    assert torch.isnan(nan_sum.value("w")).all()  # the score's finiteness check then names the parameter
    huge = ExactSum(2, CPU)
    huge.add(torch.tensor([1.0, 2.0 ** 44]))
    with pytest.raises(SafeneuronsError, match="model.w.*--accumulate-dtype float32"):
        huge.value("model.w")


@pytest.fixture(scope="module")
def tiny_model(demo_tokenizer):
    return make_tiny_llama(demo_tokenizer, seed=3, layers=2, hidden=32, intermediate=64, heads=4)


def scores_of(model, tokenizer, method: str, **overrides) -> dict[str, torch.Tensor]:
    config = ScoreConfig(method=method, keep_scores=True, **{"sparsity_ratio": RATIO, **TINY_SAMPLES,
                                                             "nsamples": 12, **overrides})
    return score_model(model, tokenizer, config).scores


@pytest.mark.parametrize("method", ["wanda", "wandg"])
def test_exact_scores_are_bit_identical_at_batch_sizes_1_and_4(tiny_model, demo_tokenizer, method):
    """Samples of several lengths: padded batches changed each sample's activations in their last bits."""
    samples = load_samples(TINY_SAMPLES["data"], demo_tokenizer, 12, TINY_SAMPLES["seed"], TINY_SAMPLES["max_length"])
    assert len({len(sample.input_ids) for sample in samples}) > 3
    one, four = (scores_of(tiny_model, demo_tokenizer, method, batch_size=size) for size in (1, 4))
    assert one.keys() == four.keys()
    assert all(torch.equal(one[name], four[name]) for name in one)


def test_accumulate_in_the_model_dtype_equals_the_original_bf16_gradient_sums(demo_tokenizer):
    """bf16 model: Σ |param.grad| in bf16 buffers, |W| · Σ in bf16 (as the original's `zeros_like(weight)`)."""
    model = make_tiny_llama(demo_tokenizer, seed=5, layers=2, hidden=32, intermediate=64, heads=4).to(torch.bfloat16)
    samples = load_samples(TINY_SAMPLES["data"], demo_tokenizer, 12, TINY_SAMPLES["seed"], TINY_SAMPLES["max_length"])
    ours = scores_of(model, demo_tokenizer, "wandg", accumulate_dtype="model")
    fp32 = scores_of(model, demo_tokenizer, "wandg")
    linears = {name: module for layer in range(2) for name, module in layer_linears(model, layer).items()}
    reference = reference_statistics(model, samples, linears, "wandg", in_model_dtype=True)
    for name, module in linears.items():
        expected = (module.weight.detach().abs() * reference[name]).float()
        assert reference[name].dtype == torch.bfloat16
        assert torch.equal(ours[name], expected), name
    assert any(not torch.equal(ours[name], fp32[name]) for name in ours)  # bf16 sums are not the fp32 sums


@pytest.mark.parametrize("method", ["wanda", "random"])
def test_accumulate_in_the_model_dtype_is_for_wandg_only(method):
    with pytest.raises(SafeneuronsError, match=f"--accumulate-dtype model .* not {method}"):
        ScoreConfig(method=method, data="demo-align", sparsity_ratio=0.1, accumulate_dtype="model").validate()


def test_the_fused_add_writes_the_eager_steps_words():
    """The compiled one-pass add and the eager steps give the same fixed-point words bit for bit, on whole sums and
    on one expert's slice, for terms across the whole range (tiny, fractional, whole, near the largest allowed)."""
    from safeneurons.scores import accumulators

    generator = torch.Generator().manual_seed(0)
    terms = [torch.rand(6, 33, generator=generator) * 10.0 ** exponent for exponent in (-20, -3, 0, 4, 12)]
    ExactSum(3, torch.device("cpu")).add(torch.ones(3))
    if accumulators._fused_add[0] is None:
        pytest.skip("torch.compile cannot build the fused kernel here (no C++ compiler): only the eager steps run")
    words = []
    for fused in (True, False):
        saved = list(accumulators._fused_add)
        if not fused:
            accumulators._fused_add[:] = [None]
        try:
            whole, sliced = ExactSum((6, 33), torch.device("cpu")), ExactSum((3, 6, 33), torch.device("cpu"))
            for term in terms:
                whole.add(term)
                sliced.add(term, index=1)
            words.append([tensor.clone() for tensor in (*whole.tensors(), *sliced.tensors())])
        finally:
            accumulators._fused_add[:] = saved
    assert all(torch.equal(a, b) for a, b in zip(*words))
    assert not words[0][3][0].any() and words[0][3][1].any()  # the slice alone received the terms
