"""`patch --shard layers`: each stage caches the source activations and the base-run inputs of its own layers,
a batch of one layer's patches starts on the stage that holds it, the last stage computes the metric. Exact
(cross-model) and attribution patching on 2 stages give 1 rank's values, bit for bit at one thread per rank."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import run_ranks
from safeneurons import cli

PROMPT = "Give me step by step instructions to {} a farm."  # equal token lengths: every position pairs up
PATCH = ["patch", "--model", "demo-chat", "--clean", PROMPT.format("help"), "--corrupted", PROMPT.format("poison"),
         "--components", "residual,attn_out,mlp_out,attn_head", "--positions", "each,last", "--batch-size", "7"]


@pytest.fixture
def one_thread():
    """The ranks run one thread each; so does the 1-rank reference (a matmul's summation order follows the
    thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _one_and_two_stages(tmp_path, options: list[str]) -> tuple[dict, dict]:
    command = [*PATCH, *options]
    assert cli.main([*command, "--out", str(tmp_path / "one")]) == 0
    launch = run_ranks(["safeneurons.cli", *command, "--shard", "layers", "--out", str(tmp_path / "two")])
    assert launch.returncode == 0, launch.stderr[-3000:]
    return tuple(json.loads((tmp_path / name / "patching.json").read_text()) for name in ("one", "two"))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("options", [["--method", "exact", "--source-model", "demo-base"],
                                     ["--method", "attribution"]], ids=["exact-cross-model", "attribution"])
def test_two_stages_patch_every_site_as_one_rank(tmp_path, one_thread, options):
    one, two = _one_and_two_stages(tmp_path, options)
    positions = len(one["base_tokens"]) + 1  # each token, and the last again
    assert len(one["sites"]) == 6 * (3 + 4) * positions  # 6 layers × (3 components + 4 heads)
    assert [site["patched_metric"] for site in one["sites"]] == [site["patched_metric"] for site in two["sites"]]
    assert (one["clean_metric"], one["corrupted_metric"]) == (two["clean_metric"], two["corrupted_metric"])
    assert one["n_significant"] == two["n_significant"] > 0
    assert one.get("exact_check") == two.get("exact_check")  # attribution's own exact check, sharded as well
