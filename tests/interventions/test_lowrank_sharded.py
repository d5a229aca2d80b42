"""`lowrank --shard layers`: each stage accumulates the Grams of its own layers from pipelined passes, computes
their new weights and writes its block; the folder equals, tensor for tensor, the one 1 rank holding the whole
model writes."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import run_ranks
from safeneurons import cli


@pytest.mark.slow
@pytest.mark.distributed
def test_three_stages_remove_the_ranks_one_rank_removes_layer_by_layer(tied_llama, tmp_path):
    """ActSVD with utility ranks kept, in the original's layer-by-layer schedule (a pipeline sweep per layer,
    each on the layers already modified below; micro-batches of 2), on 3 ranks each holding its block: every
    weight of the written model is 1 rank's, bit for bit, and the folder loads as one model."""
    folder, _ = tied_llama
    command = ["lowrank", "--model", str(folder), "--data", "demo-align", "--utility-data", "demo-utility",
               "--nsamples", "9", "--max-length", "48", "--rank-safety", "3", "--rank-utility", "5", "--batch-size",
               "2", "--sequential"]
    assert cli.main([*command, "--out", str(tmp_path / "one")]) == 0
    launch = run_ranks(["safeneurons.cli", *command, "--shard", "layers", "--out", str(tmp_path / "three")], nproc=3)
    assert launch.returncode == 0, launch.stderr[-3000:]
    one, three = (AutoModelForCausalLM.from_pretrained(tmp_path / name).state_dict() for name in ("one", "three"))
    assert one.keys() == three.keys() and all(torch.equal(one[name], three[name]) for name in one)
    original = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert not torch.equal(one["model.layers.4.mlp.down_proj.weight"], original["model.layers.4.mlp.down_proj.weight"])
    index = json.loads((tmp_path / "three" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # one shard per stage
    summaries = [json.loads((tmp_path / name / "lowrank_summary.json").read_text()) for name in ("one", "three")]
    assert summaries[0]["per_linear"] == summaries[1]["per_linear"]
