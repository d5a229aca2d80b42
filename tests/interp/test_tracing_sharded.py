"""`trace --shard layers`: both models held one block of layers per rank, each stage recording and matching its
own layers: the p-values of 1 rank holding both models; pairs that would cross stages refused in one line."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import run_expecting_error, run_ranks
from safeneurons import cli

TRACE = ["trace", "--random-tokens", "--n-tokens", "300", "--max-length", "32", "--batch-size", "2"]


@pytest.fixture(scope="module")
def perturbed_copy(tied_llama, tmp_path_factory):
    """The tied Llama with every weight moved by N(0, 0.02²): dependent, with p-values not all 0."""
    folder, _ = tied_llama
    model = AutoModelForCausalLM.from_pretrained(folder)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    copy = tmp_path_factory.mktemp("perturbed") / "model"
    model.save_pretrained(copy)
    AutoTokenizer.from_pretrained(folder).save_pretrained(copy)
    return copy


@pytest.mark.slow
@pytest.mark.distributed
def test_two_stages_give_the_p_values_of_one_rank(tied_llama, perturbed_copy, tmp_path):
    folder, _ = tied_llama
    command = [*TRACE, "--base", str(folder), "--other", str(perturbed_copy)]
    assert cli.main([*command, "--out", str(tmp_path / "one")]) == 0
    launch = run_ranks(["safeneurons.cli", *command, "--shard", "layers", "--out", str(tmp_path / "two")])
    assert launch.returncode == 0, launch.stderr[-3000:]
    one, two = (json.loads((tmp_path / name / "trace.json").read_text()) for name in ("one", "two"))
    layers = [[{key: value for key, value in layer.items() if key != "seconds"} for layer in result["layers"]]
              for result in (one, two)]
    assert layers[0] == layers[1] and len(layers[0]) == 5
    assert any(0 < layer["pvalue"] < 1e-3 for layer in layers[0])  # real p-values, not only the 0 floor
    assert two["world_size"] == 2


def test_pairs_across_stages_are_refused_before_any_weight(tied_llama, tiny_llama_dir, tmp_path, capsys):
    folder, _ = tied_llama
    trace = [*TRACE, "--base", str(folder), "--shard", "layers", "--out", str(tmp_path / "out")]
    assert "--all-layers with --shard layers" in run_expecting_error(
        [*trace, "--other", str(folder), "--all-layers"], tmp_path, capsys)
    assert "--all-layers with --shard layers" not in run_expecting_error(
        [*trace, "--other", str(folder), "--stages", "2"], tmp_path, capsys)  # 2 stages on 1 rank
    assert "splits into layers (0, 5)" in run_expecting_error(
        [*trace, "--other", str(tiny_llama_dir)], tmp_path, capsys)  # 5 layers against 2
    assert not (tmp_path / "out").exists()
