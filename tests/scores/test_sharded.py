"""`score --shard layers`: each rank holds one block of decoder layers read from the safetensors, the hidden states
(and wandg's gradients) passed stage to stage. The split against a brute-force search, the 1F1B order against a
simulation of blocking receives, a block's tensors against the checkpoint, 3 stages = 1 unsharded rank bit for
bit, and the inputs refused before any weight is read."""
from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from helpers import REPO, run_expecting_error, run_ranks, tiny_model
from safeneurons import cli
from safeneurons.errors import SafeneuronsError
from safeneurons.masks.io import load_masks
from safeneurons.models.blocks import balanced_split, load_block
from safeneurons.models.loading import load_tokenizer
from safeneurons.runtime.pipeline import one_forward_one_backward


def test_the_split_minimises_the_largest_stage_as_a_brute_force_search_does():
    rng = random.Random(0)
    for _ in range(40):
        layers, stages = rng.randint(1, 7), rng.randint(1, 4)
        if stages > layers:
            continue
        params = [rng.randint(1, 9) for _ in range(layers)]
        first, last = rng.randint(0, 12), rng.randint(0, 12)
        split = balanced_split(params, first, last, stages)

        def largest(starts):
            return max(sum(params[a:b]) + (first if s == 0 else 0) + (last if s == stages - 1 else 0)
                       for s, (a, b) in enumerate(zip(starts, starts[1:])))

        best = min(largest((0, *cuts, layers)) for cuts in itertools.combinations(range(1, layers), stages - 1))
        assert split.starts[0] == 0 and split.starts[-1] == layers
        assert all(a < b for a, b in zip(split.starts, split.starts[1:]))  # contiguous, none empty
        assert max(split.params) == largest(split.starts) == best
        assert [split.stage_of(layer) for layer in range(layers)] == [
            s for s in range(stages) for _ in split.block(s)]


def test_more_stages_than_layers_is_refused():
    with pytest.raises(SafeneuronsError, match="over 3 ranks: the model has 2 decoder layers"):
        balanced_split([5, 5], 0, 0, 3)


def test_the_1f1b_order_runs_every_pass_once_without_deadlock():
    """Each stage's order, executed with blocking receives (a stage's forward waits for the stage below, its
    backward for the stage above), finishes, and no stage holds more than `stages − stage` micro-batches."""
    for stages, count in itertools.product(range(1, 5), range(1, 7)):
        orders = [one_forward_one_backward(stage, stages, count) for stage in range(stages)]
        for stage, order in enumerate(orders):
            assert sorted(order) == sorted([("F", i) for i in range(count)] + [("B", i) for i in range(count)])
            held = 0
            for kind, index in order:
                held += 1 if kind == "F" else -1
                assert 0 <= held <= stages - stage
                if kind == "B":
                    assert order.index(("F", index)) < order.index(("B", index))
        done, position = set(), [0] * stages
        while any(position[s] < len(orders[s]) for s in range(stages)):
            moved = False
            for stage in range(stages):
                if position[stage] == len(orders[stage]):
                    continue
                kind, index = orders[stage][position[stage]]
                needs = (stage - 1, "F", index) if kind == "F" and stage > 0 else (
                    (stage + 1, "B", index) if kind == "B" and stage < stages - 1 else None)
                if needs is None or needs in done:
                    done.add((stage, kind, index))
                    position[stage] += 1
                    moved = True
            assert moved, f"deadlock: {stages} stages, {count} micro-batches"


def test_a_block_holds_its_layers_from_the_checkpoint_and_nothing_else(tied_llama):
    folder, model = tied_llama
    original = model.state_dict()
    for stage in range(2):
        block = load_block(str(folder), stage, 2, torch.float32, torch.device("cpu"))
        inside = [f"model.layers.{layer}." for layer in block.layers]
        for name, tensor in block.model.state_dict().items():
            held = any(name.startswith(prefix) for prefix in inside) or (
                stage == 0 and name.startswith("model.embed_tokens.")) or (
                stage == 1 and name.startswith(("lm_head.", "model.norm.")))
            assert (tensor.device.type != "meta") == held, name
            if held:
                assert torch.equal(tensor, original[name]), name
        assert isinstance(block.model.model.norm, torch.nn.Identity) == (stage == 0)
    assert block.split.starts == (0, 3, 5)  # the tied head's copy weighs on the last stage
    assert torch.equal(block.model.lm_head.weight, original["model.embed_tokens.weight"])


ARGS = ["--data", "demo-align", "--nsamples", "9", "--max-length", "48", "--sparsity-ratio", "0.1"]


@pytest.mark.slow
@pytest.mark.distributed
def test_three_stages_give_the_masks_of_one_unsharded_rank(tied_llama, tmp_path):
    """wandg's set difference in the original's layer-by-layer schedule (each layer scored after the layers below
    are pruned: a pipeline sweep per layer), micro-batches of 2 (1F1B with two micro-batches in flight on the
    first stage), on 3 ranks each holding its block: the masks and counts of 1 rank holding the whole model, bit
    for bit. (The all-layers schedule on 2 stages: tests/workflows/test_pipeline.py, under two ranks.)"""
    folder, _ = tied_llama
    command = ["score", "--model", str(folder), "--method", "wandg", *ARGS, "--utility-data", "demo-utility",
               "--p", "0.1", "--q", "0.2", "--batch-size", "2", "--sequential"]
    assert cli.main([*command, "--out", str(tmp_path / "one")]) == 0
    launch = run_ranks(["safeneurons.cli", *command, "--shard", "layers", "--out", str(tmp_path / "three")],
                       nproc=3)
    assert launch.returncode == 0, launch.stderr[-3000:]
    one, three = load_masks(tmp_path / "one"), load_masks(tmp_path / "three")
    assert one.keys() == three.keys() and all(torch.equal(one[name], three[name]) for name in one)
    summaries = [json.loads((tmp_path / name / "score_summary.json").read_text()) for name in ("one", "three")]
    blocks = summaries[1]["layer_split"]["blocks"]
    assert len(blocks) == 3 and blocks[0][0] == 0 and blocks[-1][1] == 5  # every stage held a block
    assert summaries[0]["per_parameter"] == summaries[1]["per_parameter"]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_stages_times_two_replicas_of_a_fused_architecture_give_wandas_masks(tmp_path):
    """Phi-3 (fused qkv and gate/up), wanda on 4 ranks = 2 stages × 2 replicas (each replica half the samples, a
    stage's two ranks summing exactly): the masks of 1 rank."""
    tokenizer = load_tokenizer("demo")
    folder = tmp_path / "phi3"
    model = tiny_model("phi3", tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    command = ["score", "--model", str(folder), "--method", "wanda", *ARGS]
    assert cli.main([*command, "--out", str(tmp_path / "one")]) == 0
    launch = run_ranks(["safeneurons.cli", *command, "--shard", "layers", "--stages", "2", "--out",
                        str(tmp_path / "four")], nproc=4)
    assert launch.returncode == 0, launch.stderr[-3000:]
    one, four = load_masks(tmp_path / "one"), load_masks(tmp_path / "four")
    assert one.keys() == four.keys() and all(torch.equal(one[name], four[name]) for name in one)
    assert json.loads((tmp_path / "four" / "score_summary.json").read_text())["world_size"] == 4


def test_bad_sharding_is_one_line_before_any_weight(tied_llama, tmp_path, capsys):
    folder, _ = tied_llama
    score = ["score", "--model", str(folder), "--method", "wandg", *ARGS, "--shard", "layers", "--out",
             str(tmp_path / "out")]
    assert "give one or the other" in run_expecting_error(
        [*score, "--deepspeed", "ds_configs/zero3_inference.json"], tmp_path, capsys)
    assert "positive divisor of the 1 ranks" in run_expecting_error([*score, "--stages", "2"], tmp_path, capsys)
    assert "with --shard layers" in run_expecting_error([*score[:-4], "--stages", "2", *score[-2:]], tmp_path,
                                                        capsys)
    tokenizer = load_tokenizer("demo")
    gemma = tmp_path / "gemma2"
    tiny_model("gemma2", tokenizer).save_pretrained(gemma)
    tokenizer.save_pretrained(gemma)
    assert "rescales the hidden states" in run_expecting_error(
        ["score", "--model", str(gemma), *score[3:]], tmp_path, capsys)
    assert not (tmp_path / "out").exists()


def test_plan_splits_a_model_as_score_does(tied_llama):
    """`plan`'s layer-sharded blocks for a model folder are the blocks `score --shard layers` loads."""
    from safeneurons.workflows.plan import Cluster, Workload, plan_report
    from safeneurons.workflows.plan_model import model_shape

    folder, _ = tied_llama
    for stages in (2, 3):
        report = plan_report(model_shape(str(folder)), Cluster(1, stages), Workload())["score_layer_sharded"]
        split = load_block(str(folder), 0, stages, torch.float32, torch.device("cpu")).split
        assert report["blocks"] == [[block.start, block.stop] for block in map(split.block, range(stages))]


DYING_STAGE = """
import os, sys
from safeneurons import cli
from safeneurons.runtime import pipeline

receive = pipeline.StageLink.receive_activation


def dying(self, *args, **kwargs):  # stage 1 dies as its first micro-batch arrives, stage 0 mid-pipeline
    if self.stage == 1:
        os._exit(7)
    return receive(self, *args, **kwargs)


pipeline.StageLink.receive_activation = dying
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_a_stage_that_dies_mid_pipeline_ends_the_job_and_publishes_nothing(tied_llama, tmp_path):
    folder, _ = tied_llama
    script = tmp_path / "dying_stage.py"
    script.write_text(DYING_STAGE)
    out = tmp_path / "masks"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), "score", "--model", str(folder), "--method", "wandg", *ARGS, "--shard",
                           "layers", "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "SAFENEURONS_TIMEOUT": "15"})
    assert done.returncode != 0
    assert not out.exists()


def test_auto_sharding_holds_a_model_by_layers_only_when_it_does_not_fit(tied_llama, tmp_path, monkeypatch):
    """`--shard auto`'s rule: layer-sharded when the weights (from the headers) take more than half of a rank's
    free memory, and never for a model that cannot be sharded."""
    from safeneurons.models.blocks import needs_layer_sharding
    from safeneurons.runtime import distributed

    folder, model = tied_llama
    weights = sum(tensor.numel() * 4 for name, tensor in model.state_dict().items() if name != "lm_head.weight")
    cpu = torch.device("cpu")
    monkeypatch.setattr(distributed, "available_memory", lambda device: 2 * weights)
    assert needs_layer_sharding(str(folder), "float32", cpu) == ""  # exactly half: it fits
    monkeypatch.setattr(distributed, "available_memory", lambda device: 2 * weights - 8)
    assert "more than half of a rank's" in needs_layer_sharding(str(folder), "float32", cpu)
    gemma = tmp_path / "gemma2"
    tiny_model("gemma2", load_tokenizer("demo")).save_pretrained(gemma)
    load_tokenizer("demo").save_pretrained(gemma)
    monkeypatch.setattr(distributed, "available_memory", lambda device: 1)
    assert needs_layer_sharding(str(gemma), "float32", cpu) == ""  # refused by --shard layers: stays whole
