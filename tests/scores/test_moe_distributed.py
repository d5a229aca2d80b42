"""A mixture of experts on several ranks: wandg's masks and scores on 2 data-parallel ranks and on 2 pipeline
stages (`--shard layers`) equal 1 rank's bit for bit, the experts' token counts included; 2-rank ZeRO-3
fine-tuning keeps frozen expert slices bit-identical under weight decay."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import (REPO, assert_frozen_identical_free_changed, random_masks, report, run_ranks, tiny_moe,
                     weights)
from safeneurons import cli
from safeneurons.masks.io import load_masks, save_masks


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, demo_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("moe") / "qwen2_moe"
    tiny_moe("qwen2_moe", demo_tokenizer, seed=4).save_pretrained(folder, save_original_format=False)
    demo_tokenizer.save_pretrained(folder)
    return folder


def scores_of(folder: Path) -> dict[str, torch.Tensor]:
    """scores.safetensors, or its shards through the index (one shard per rank that owns layers)."""
    if (folder / "scores.safetensors").is_file():
        return load_file(folder / "scores.safetensors")
    shards = set(json.loads((folder / "scores.safetensors.index.json").read_text())["weight_map"].values())
    return {name: tensor for shard in shards for name, tensor in load_file(folder / shard).items()}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", [(), ("--shard", "layers")], ids=["data-parallel", "two-stages"])
def test_two_ranks_score_an_moe_as_one_rank(moe_dir, tmp_path, layout):
    args = ["score", "--model", str(moe_dir), "--method", "wandg", "--data", "demo-align", "--nsamples", "7",
            "--max-length", "48", "--sparsity-ratio", "0.2", "--save-scores"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs: kernels split over threads sum in another order
    try:
        assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    launch = run_ranks(["safeneurons.cli", *args, *layout, "--out", str(tmp_path / "two")])
    assert launch.returncode == 0, launch.stderr[-3000:]
    one, two = load_masks(tmp_path / "one"), load_masks(tmp_path / "two")
    assert one.keys() == two.keys() and all(torch.equal(one[name], two[name]) for name in one)
    scores_one, scores_two = (scores_of(tmp_path / run) for run in ("one", "two"))
    assert scores_one.keys() == scores_two.keys()
    assert all(torch.equal(scores_one[name], scores_two[name]) for name in scores_one)
    summaries = [json.loads((tmp_path / run / "score_summary.json").read_text()) for run in ("one", "two")]
    assert summaries[0]["experts"] == summaries[1]["experts"]
    assert sum(summaries[0]["experts"]["1"]["response_tokens"]) > 0


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_fine_tuning_keeps_frozen_expert_slices(moe_dir, tmp_path, demo_tokenizer):
    model = tiny_moe("qwen2_moe", demo_tokenizer, seed=4)
    masks = random_masks(model)
    masks.update({name: torch.rand(param.shape, generator=torch.Generator().manual_seed(1)) < 0.3
                  for name, param in model.named_parameters() if name.endswith("mlp.gate.weight")})
    assert masks["model.layers.1.mlp.experts.gate_up_proj"].dim() == 3
    save_masks(masks, tmp_path / "masks")
    launch = run_ranks(["safeneurons.cli", "finetune", "--model", str(moe_dir), "--masks",
                        str(tmp_path / "masks" / "masks.safetensors"), "--data", "demo-utility", "--nsamples", "8",
                        "--max-length", "48", "--weight-decay", "0.1", "--learning-rate", "5e-3",
                        "--deepspeed", str(REPO / "ds_configs" / "zero3.json"), "--dtype", "bfloat16",
                        "--batch-size", "2", "--num-epochs", "1", "--save-path", str(tmp_path / "out")], timeout=240)
    assert launch.returncode == 0, launch.stderr[-3000:]
    assert_frozen_identical_free_changed(weights(moe_dir), weights(tmp_path / "out"), masks)
    summary = report(tmp_path / "out")
    assert summary["max_abs_change_frozen"] == 0.0 and summary["world_size"] == 2
    assert summary["frozen_count"] == sum(int(mask.sum()) for mask in masks.values())
