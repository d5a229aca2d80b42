"""Sums of per-sample statistics: fixed-point and exact sums are the same bit for bit in any order, grouping
(ranks) and batch size; `--accumulate-dtype model` sums in the model's dtype as the original code does."""
from __future__ import annotations

import math
import re
from fractions import Fraction

import pytest
import torch

from helpers import RATIO, TINY_SAMPLES, layer_linears, make_tiny_llama, reference_statistics
from safeneurons import SafeneuronsError
from safeneurons.data.samples import load_samples
from safeneurons.scores.accumulators import HEADROOM_BITS, ExactSum, FixedPointSum, RunningSum, agree_on_units
from safeneurons.scores.config import ScoreConfig
from safeneurons.scores.passes import equal_length_groups
from safeneurons.scores.schedules import score_model

CPU = torch.device("cpu")


def wide_range_terms(count: int, shape: tuple[int, ...], seed: int = 0, low: int = -30,
                     high: int = 20) -> list[torch.Tensor]:
    """Non-negative fp32 terms over 2^low..2^high, where fp32 running sums lose bits in an order-dependent way."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=generator) * 2.0 ** torch.randint(low, high, shape, generator=generator)
            for _ in range(count)]


def fixed_sum(shape: tuple[int, ...], samples: int, first: torch.Tensor) -> FixedPointSum:
    """A fixed-point sum whose units come from `first` (the first sample's term), as `agree_on_units` sets them."""
    total = FixedPointSum(shape, CPU, samples)
    agree_on_units({"w": total}, {"w": first.amax(dim=-1)}, lambda flat: None)
    return total


def grouped_sum(terms: list[torch.Tensor], groups: int, new) -> torch.Tensor:
    """The terms dealt round-robin to `groups` accumulators `new()` (as ranks), whose words are then added (as the
    reduce)."""
    parts = [new() for _ in range(groups)]
    for index, term in enumerate(terms):
        parts[index % groups].add(term)
    total = parts[0]
    for part in parts[1:]:
        for mine, theirs in zip(total.tensors(), part.tensors()):
            mine += theirs
    return total.value()


def shuffled(terms: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    return [terms[i] for i in torch.randperm(len(terms), generator=torch.Generator().manual_seed(seed))]


def float64_sums(terms: list[torch.Tensor]) -> torch.Tensor:
    """Σ in float64, correctly rounded (math.fsum), element by element."""
    stacked = torch.stack(terms).double().reshape(len(terms), -1)
    return torch.tensor([math.fsum(stacked[:, k].tolist()) for k in range(stacked.shape[1])],
                        dtype=torch.float64).reshape(terms[0].shape)


def test_exact_sums_are_the_correctly_rounded_sum_in_any_order_and_grouping():
    terms = wide_range_terms(3000, (4, 5))  # > 2^11 terms: the low word is carried on the way
    reference = float64_sums(terms).float()
    for ordered, groups in ((terms, 1), (shuffled(terms), 1), (terms, 2), (shuffled(terms), 7)):
        assert torch.equal(grouped_sum(ordered, groups, lambda: ExactSum((4, 5), CPU)), reference), groups


def test_fixed_point_sums_equal_the_float64_sum_rounded_to_fp32_in_any_order_and_on_1_2_4_ranks():
    """Terms within 2^(⌈log2 N⌉ − 19) of their row's reference are added exactly: over 2^-12..2^1 (the sums
    stay within float64's 53 bits, so fsum is their exact sum) the result is that sum rounded once to fp32."""
    terms = wide_range_terms(1000, (6, 7), low=-12, high=1)
    reference = float64_sums(terms).float()
    for ordered, groups in ((terms, 1), (shuffled(terms), 1), (terms, 2), (shuffled(terms, 2), 4)):
        assert torch.equal(grouped_sum(ordered, groups, lambda: fixed_sum((6, 7), len(terms), terms[0])),
                           reference), groups
    assert not torch.equal(grouped_sum(terms, 1, lambda: RunningSum((6, 7), CPU, torch.float32)), reference)


def test_fixed_point_sums_of_wide_range_terms_are_within_n_units_below_the_exact_sum_on_any_split():
    """Terms over 2^-30..2^20, tiny ones below the unit: the same bits in any order and on 1, 2 and 4 ranks, and
    below the exact sum by less than N units of the row (plus fp32's rounding)."""
    terms = wide_range_terms(500, (4, 5), seed=3)
    terms[0] = 2.0 ** 10 * (1 + terms[0] / 2.0 ** 20)  # a first sample within the headroom of every later term
    sums = [grouped_sum(ordered, groups, lambda: fixed_sum((4, 5), len(terms), terms[0]))
            for ordered, groups in ((terms, 1), (shuffled(terms), 2), (shuffled(terms, 3), 4))]
    assert all(torch.equal(sums[0], other) for other in sums[1:])
    total = fixed_sum((4, 5), len(terms), terms[0])
    exact = float64_sums(terms)
    unit = 1.0 / total.scale.double()
    assert (unit > 2.0 ** -30).all()  # tiny terms are truncated: the bound is what is tested
    rounding = exact * 2.0 ** -23
    assert ((exact - sums[0].double()) < len(terms) * unit + rounding).all()
    assert ((sums[0].double() - exact) <= rounding).all()


def test_fixed_point_value_is_the_integer_sum_rounded_once_to_nearest_even():
    """int64 → fp32 rounds once (no detour through float64, which rounds twice): against the rounding done with
    Python's integers."""
    total = FixedPointSum(4, CPU, 1)
    total.set_references(torch.tensor(0.5))  # 1 / unit = 2^(62 − 0 − 20 − 0)
    words = [2 ** 61 + 2 ** 37 + 1, 2 ** 61 + 2 ** 37, 2 ** 61 + 3 * 2 ** 37, 2 ** 40 + 2 ** 16 + 2 ** 15]
    total.words += torch.tensor(words)
    unit = Fraction(1, 2 ** (62 - HEADROOM_BITS))
    for word, value in zip(words, total.value().tolist()):
        shift = max(word.bit_length() - 24, 0)
        kept, rest = divmod(word, 2 ** shift)
        half = 2 ** shift // 2
        kept += shift > 0 and (rest > half or (rest == half and kept % 2 == 1))
        assert Fraction(value) == kept * 2 ** shift * unit, word


def test_fixed_point_units_come_from_each_rows_first_term_and_zero_rows_take_the_largest():
    total = fixed_sum((3, 2), 8, torch.tensor([[1.0, 0.75], [0.0, 0.0], [3.0, 2.0 ** -40]]))
    # ⌈log2 8⌉ = 3: a row whose reference lies in [2^(e−1), 2^e) counts units of 2^(e + 20 + 3 − 62)
    assert (1.0 / total.scale).flatten().tolist() == [2.0 ** (1 - 39), 2.0 ** (2 - 39), 2.0 ** (2 - 39)]


def test_non_finite_and_too_large_terms_are_named_in_one_line():
    for new, too_large, remedy in ((lambda: ExactSum(3, CPU), 2.0 ** 44, "float32"),
                                   (lambda: fixed_sum((3,), 4, torch.ones(3)), 2.0 ** (HEADROOM_BITS + 1), "exact")):
        nan_sum = new()
        nan_sum.add(torch.tensor([1.0, float("inf"), 2.0]))
        assert torch.isnan(nan_sum.value()).all()  # the score's finiteness check then names the parameter
        huge = new()
        huge.add(torch.tensor([1.0, too_large, 0.5]))
        assert re.fullmatch(f"a per-sample statistic of model.w [^\n]*; use --accumulate-dtype {remedy}",
                            huge.problem("model.w"))
    within = fixed_sum((3,), 4, torch.ones(3))  # reference 1 < 2^1: terms below 2^(1 + 20) are in range
    within.add(torch.tensor([1.0, 2.0 ** (HEADROOM_BITS + 1) * 0.99, 0.5]))
    assert within.value()[1] == 2.0 ** (HEADROOM_BITS + 1) * 0.99


def test_a_sum_beyond_the_fixed_point_range_is_one_line_naming_the_matrix(tmp_path, capsys, monkeypatch):
    """A headroom below nothing (terms over 2^-8 of the first sample's are out of range): `score` stops with one
    line (after the passes' progress bar) that names a matrix and the remedy, and writes nothing."""
    from safeneurons import cli
    from safeneurons.scores import accumulators

    monkeypatch.setattr(accumulators, "HEADROOM_BITS", -8)
    assert cli.main(["score", "--model", "demo", "--method", "wandg", "--data", "demo-align", "--nsamples", "3",
                     "--max-length", "48", "--sparsity-ratio", "0.1", "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().split("\r")[-1].split("safeneurons: error: ")[-1]
    assert re.fullmatch(r".*a per-sample statistic of model\.layers\.\d+\.\S+\.weight exceeds 2\^-8 times .*; use "
                        r"--accumulate-dtype exact", error), error
    assert not (tmp_path / "out").exists()


def test_running_float32_sums_depend_on_the_order():
    """The property the exact sums exist for: fp32 running sums of the same terms differ in their last bits."""
    terms = wide_range_terms(3000, (4, 5))
    sums = []
    for ordered in (terms, terms[::-1]):
        running = RunningSum((4, 5), CPU, torch.float32)
        for term in ordered:
            running.add(term)
        sums.append(running.value())
    assert not torch.equal(*sums)


def test_the_first_sample_leads_the_first_micro_batch():
    """Chunks of one length in the order of their first samples: the first sample (whose terms set the units of
    fixed-point sums) is row 0 of batch 0, and batches of 1 keep the samples' order."""
    class Sample:
        def __init__(self, length: int) -> None:
            self.input_ids = [0] * length

    samples = [Sample(length) for length in (5, 3, 3, 3, 5, 3, 3)]
    chunks = equal_length_groups(samples, 3)
    assert [[samples.index(sample) for sample, _ in chunk] for chunk in chunks] == [[0, 4], [1, 2, 3], [5, 6]]
    assert [chunk[0][0] for chunk in equal_length_groups(samples, 1)] == samples


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


def test_only_runs_that_pay_for_the_compiler_compile_the_add_step(monkeypatch):
    from safeneurons.scores import accumulators

    started = []
    monkeypatch.setattr(accumulators, "start_compiling", lambda step, device: started.append(step))
    accumulators.compile_if_worth("fixed", accumulators.COMPILE_WORTH - 1, CPU)
    accumulators.compile_if_worth("float32", 10 * accumulators.COMPILE_WORTH, CPU)
    assert not started
    accumulators.compile_if_worth("fixed", accumulators.COMPILE_WORTH, CPU)
    accumulators.compile_if_worth("exact", accumulators.COMPILE_WORTH, CPU)
    assert started == [accumulators._scaled_add, accumulators._fixed_point_add]


def test_the_compiled_adds_write_the_chunked_eager_steps_words(monkeypatch):
    """The compiled one-pass adds and the eager steps on chunks of rows (3 rows of 33 here, so the slices cross
    chunks) give the same words bit for bit, on whole sums and on one expert's slice, for terms across the whole
    range (tiny, fractional, whole, near the largest allowed)."""
    from safeneurons.scores import accumulators

    generator = torch.Generator().manual_seed(0)
    terms = [torch.rand(6, 33, generator=generator) * 10.0 ** exponent for exponent in (-20, -3, 0, 4, 12)]
    kinds = {"exact": (lambda shape: ExactSum(shape, CPU), accumulators._fixed_point_add),
             "fixed": (lambda shape: fixed_sum(shape, 8, torch.full(shape, 1e12)), accumulators._scaled_add)}
    monkeypatch.setattr(accumulators, "CHUNK_ELEMENTS", 100)
    for kind, (new, step) in kinds.items():
        words = []
        for compiled in (False, True):
            monkeypatch.setattr(accumulators, "_compiled", {})
            if compiled:
                accumulators.compile_step(step, CPU)
                if accumulators._compiled[step, "cpu"] is None:
                    pytest.skip("torch.compile cannot build the fused kernel here (no C++ compiler)")
            whole, sliced = new((6, 33)), new((3, 6, 33))
            for term in terms:
                whole.add(term)
                sliced.add(term, index=1)
            words.append([tensor.clone() for tensor in (*whole.tensors(), *sliced.tensors())])
        assert accumulators._compiled[step, "cpu"] is not None  # the second run's adds were the compiled step's
        assert all(torch.equal(a, b) for a, b in zip(*words)), kind
        sliced_words = words[0][len(whole.tensors())]
        assert not sliced_words[0].any() and sliced_words[1].any(), kind  # the slice alone received the terms
