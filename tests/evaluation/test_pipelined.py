"""`eval --shard layers`: generation and perplexity pipelined through the ranks' blocks of layers, each stage with
its own KV cache. Greedy and sampled generations and the perplexity equal those of 1 rank holding the whole model;
what the pipeline cannot apply is refused in one line."""
from __future__ import annotations

import json
import math

import pytest

from helpers import run_expecting_error, run_ranks
from safeneurons import cli
from safeneurons.errors import SafeneuronsError
from safeneurons.evaluation.pipelined_generation import check_decoding_settings
from safeneurons.models.loading import load_model

EVAL = ["eval", "--model", "demo-chat", "--prompts", "demo-harmful", "--harmless-data", "demo-harmless",
        "--harmless-limit", "5", "--max-new-tokens", "40", "--eval-batch-size", "2", "--perplexity-data",
        "demo-utility", "--perplexity-samples", "9"]


def _eval_one_and_sharded(tmp_path, options: list[str], nproc: int, stages: int) -> tuple[dict, dict]:
    command = [*EVAL, *options]
    assert cli.main([*command, "--out", str(tmp_path / "one")]) == 0
    launch = run_ranks(["safeneurons.cli", *command, "--shard", "layers", "--stages", str(stages), "--out",
                        str(tmp_path / "sharded")], nproc=nproc)
    assert launch.returncode == 0, launch.stderr[-3000:]
    return tuple(json.loads((tmp_path / name / "eval.json").read_text()) for name in ("one", "sharded"))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_stages_times_two_replicas_generate_greedily_as_one_rank(tmp_path):
    """4 ranks = 2 stages × 2 replicas, each replica half the prompts in waves of two batches of 2 (the last one
    short), the refusals ending at EOS before 40 tokens: every generation and rate of 1 rank. The perplexity's
    texts are batched per replica (other batches, other padding, as with data parallelism): equal to rounding."""
    one, four = _eval_one_and_sharded(tmp_path, ["--eval-limit", "9"], nproc=4, stages=2)
    assert [r["generation"] for r in one["results"]] == [r["generation"] for r in four["results"]]
    assert one["results"] == four["results"] and one["harmless_results"] == four["harmless_results"]
    assert any(len(r["generation"].split()) < 30 for r in one["results"])  # some stopped at EOS
    assert (one["asr"], one["refusal_rate"]) == (four["asr"], four["refusal_rate"])
    assert math.isclose(one["perplexity"], four["perplexity"], rel_tol=1e-9)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_stages_sample_the_generations_of_one_rank(tmp_path):
    """Sampled decoding (3 samples per prompt at temperature 0.9): the last stage draws each batch's tokens from
    the seed `generate` draws it from, so the samples are those of 1 rank; the perplexity is bit for bit."""
    one, two = _eval_one_and_sharded(tmp_path, ["--eval-limit", "5", "--n-samples", "3", "--temperature", "0.9"],
                                     nproc=2, stages=2)
    assert one["results"] == two["results"] and one["harmless_results"] == two["harmless_results"]
    assert len({text for r in one["results"] for text in r["generations"]}) > len(one["results"])  # it sampled
    assert one["perplexity"] == two["perplexity"]


def test_a_generation_setting_the_pipeline_does_not_apply_is_refused():
    model = load_model("demo-chat")
    check_decoding_settings(model)
    model.generation_config.repetition_penalty = 1.3
    with pytest.raises(SafeneuronsError, match="repetition_penalty=1.3"):
        check_decoding_settings(model)


@pytest.mark.parametrize("options,message", [
    (["--lm-eval-tasks", "boolq"], "run the utility tasks in a separate unsharded eval"),
    (["--patch-neurons-from", "demo-base", "--neurons", "0:1"], "does not run with --shard layers"),
    (["--deepspeed", "ds_configs/zero3_inference.json"], "give one or the other"),
])
def test_what_a_sharded_eval_cannot_run_is_one_line_before_any_weight(tmp_path, capsys, options, message):
    out = tmp_path / "out"
    error = run_expecting_error([*EVAL, "--shard", "layers", *options, "--out", str(out)], tmp_path, capsys)
    assert message in error
    assert not out.exists()
