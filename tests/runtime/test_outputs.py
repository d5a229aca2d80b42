"""Result files appear whole or not at all; DeepSpeed "auto" values are filled or refused."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from safeneurons import masks
from safeneurons.errors import SafeneuronsError
from safeneurons.runtime import dsconfig, outputs


def test_atomic_file_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "result.bin"
    with pytest.raises(RuntimeError):
        with outputs.atomic_file(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_staging_then_publish_replaces_whole_files(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.json").write_text("{}")
    (final / "keep.txt").write_text("kept")
    staging = outputs.staging_dir(final)
    outputs.write_json(staging / "old.json", {"new": True})
    assert json.loads((final / "old.json").read_text()) == {}  # nothing visible before publishing
    outputs.publish_dir(final)
    assert json.loads((final / "old.json").read_text()) == {"new": True}
    assert (final / "keep.txt").read_text() == "kept" and not staging.exists()


def test_sharded_masks_round_trip_and_row_reads(tmp_path):
    first = {"model.layers.0.mlp.up_proj.weight": torch.rand(6, 4) > 0.5}
    second = {"model.layers.1.mlp.up_proj.weight": torch.rand(6, 4) > 0.5}
    masks.save_mask_shard(first, tmp_path, 0, 2)
    masks.save_mask_shard(second, tmp_path, 1, 2)
    masks.write_index(tmp_path, {**{name: masks.shard_name(0, 2) for name in first},
                                 **{name: masks.shard_name(1, 2) for name in second}})
    reader = masks.MaskReader(tmp_path)
    loaded = masks.load_masks(tmp_path)
    assert all(torch.equal(loaded[name], mask) for name, mask in {**first, **second}.items())
    name = next(iter(second))
    assert torch.equal(reader.get_rows(name, 2, 5), second[name][2:5])
    assert masks.count_selected(loaded) == sum(int(mask.sum()) for mask in {**first, **second}.values())


def test_mask_misfit_names_the_parameter():
    with pytest.raises(SafeneuronsError, match="mask 'b' has shape \\(2, 3\\) but the parameter has \\(3, 2\\)"):
        masks.check_masks_fit({"a": (1,), "b": (2, 3)}, {"a": (1,), "b": (3, 2)})
    with pytest.raises(SafeneuronsError, match="mask 'c' names no parameter"):
        masks.check_masks_fit({"c": (1,)}, {"a": (1,)})


def test_deepspeed_auto_values_are_filled(tmp_path):
    config = dsconfig.fill_config("ds_configs/zero3.json", micro_batch_size=4, gradient_accumulation_steps=2,
                                  world_size=8, learning_rate=2e-5, weight_decay=0.1, gradient_clipping=1.0,
                                  dtype=torch.bfloat16, hidden_size=4096)
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 2
    assert config["bf16"]["enabled"] is True
    assert config["optimizer"]["params"]["lr"] == 2e-5 and config["optimizer"]["params"]["weight_decay"] == 0.1
    assert config["zero_optimization"]["reduce_bucket_size"] == 4096 * 4096
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}))
    with pytest.raises(SafeneuronsError, match="zero_optimization.sub_group_size is 'auto'"):
        dsconfig.fill_config(bad)


def test_a_previous_result_is_replaced_by_one_rename_and_stale_staging_is_cleaned(tmp_path, monkeypatch):
    final = tmp_path / "out"
    staging = outputs.staging_dir(final)
    (staging / "half.json").write_text("left by a killed run")
    staging = outputs.staging_dir(final, fresh=True)  # a single writer starts from an empty staging folder
    assert not (staging / "half.json").exists()
    outputs.write_json(staging / "result.json", {"run": 1})
    outputs.publish_dir(final)
    assert sorted(path.name for path in final.iterdir()) == ["result.json"]
    renames = []
    real_replace = outputs.os.replace
    monkeypatch.setattr(outputs.os, "replace", lambda a, b: (renames.append((a, b)), real_replace(a, b)))
    outputs.write_json(outputs.staging_dir(final, fresh=True) / "result.json", {"run": 2})
    renames.clear()
    outputs.publish_dir(final)
    # the complete staged folder itself becomes the result: no file-by-file move a kill could cut short
    assert (tmp_path / ".out.partial", final) in renames and len(renames) == 2  # old result aside, new one in
    assert json.loads((final / "result.json").read_text()) == {"run": 2}
    assert not any(path.name.startswith(".out") for path in tmp_path.iterdir())


def test_mask_files_are_byte_identical_on_a_rerun(tmp_path):
    """safetensors writes metadata in hash order; 40 checksum entries would come out in another order each time."""
    generator = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{index}.mlp.up_proj.weight": torch.rand(4, 8, generator=generator) < 0.5
               for index in range(40)}
    first = masks.save_masks(tensors, tmp_path / "a").read_bytes()
    second = masks.save_masks(tensors, tmp_path / "b").read_bytes()
    assert first == second
    assert masks.load_masks(tmp_path / "a").keys() == tensors.keys()
    assert all(torch.equal(mask, tensors[name]) for name, mask in masks.load_masks(tmp_path / "a").items())


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_results_get_the_mode_the_user_s_umask_gives(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        mask_file = masks.save_masks({"w": torch.ones(2, 2, dtype=torch.bool)}, tmp_path / "m")
        summary = outputs.write_json(tmp_path / "summary.json", {"a": 1})
        staging = outputs.staging_dir(tmp_path / "published", fresh=True)
        (staging / "weights.bin").write_bytes(b"x")
        os.chmod(staging / "weights.bin", 0o600)  # as safetensors' writer leaves a model file
        outputs.publish_dir(tmp_path / "published")
    finally:
        os.umask(previous)
    for path in (mask_file, summary, tmp_path / "published" / "weights.bin"):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
