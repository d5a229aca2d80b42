"""Write masks, scores and the summary: shards per rank, staged, published with one rename."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from safetensors.torch import save_file

from safeneurons.errors import SafeneuronsError
from safeneurons.masks.io import save_mask_shard, save_masks, shard_name, write_index
from safeneurons.runtime import distributed
from safeneurons.runtime.outputs import atomic_file, discard_staging, publish_dir, staging_dir, write_json
from safeneurons.scores.config import SCORES_FILE, SCORES_INDEX_FILE, SUMMARY_FILE

if TYPE_CHECKING:
    from safeneurons.scores.config import ScoreResult


def _save_float_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    with atomic_file(path) as tmp:
        save_file({name: tensor.detach().float().contiguous().cpu() for name, tensor in tensors.items()}, str(tmp),
                  metadata={"format": "pt"})


def write_score_outputs(result: ScoreResult, out_dir: str | Path, save_scores: bool) -> None:
    """Collective: every rank writes its masks (and scores) as a shard of a staging folder; rank 0 writes the
    index files and the summary and then moves everything into `out_dir`. One rank writes single files."""
    if save_scores and result.scores is None:
        raise SafeneuronsError("--save-scores needs the scores: score with ScoreConfig(keep_scores=True)")
    final = Path(out_dir)
    if distributed.is_main():
        discard_staging(final)
    distributed.barrier()
    staging = staging_dir(final)
    world, rank = distributed.world_size(), distributed.rank()
    try:
        if world == 1:
            save_masks(result.masks, staging)
            if save_scores:
                _save_float_tensors(result.scores, staging / SCORES_FILE)
        else:
            save_mask_shard(result.masks, staging, rank, world)
            if save_scores:
                _save_float_tensors(result.scores, staging / shard_name(rank, world, "scores"))
        problem = None
    except OSError as error:
        problem = f"cannot write the masks to {staging}: {error}"
    try:
        distributed.all_ranks_ok(problem is None, problem or "")
        owned = distributed.gather_to_main(sorted(result.masks))
        if distributed.is_main():
            _finish_outputs(staging, owned, result.summary, save_scores)
            remove_stale_outputs(final)
            publish_dir(final)
    except BaseException:
        if distributed.is_main():
            discard_staging(final)
        raise
    finally:
        distributed.barrier()


def remove_stale_outputs(final: Path) -> None:
    """A previous run's mask and score files (say, shards of another world size) would mix with the new ones."""
    for pattern in ("masks*.safetensors*", "scores*.safetensors*", SUMMARY_FILE):
        for stale in final.glob(pattern):
            stale.unlink()


def _finish_outputs(staging: Path, owned: list[list[str]], summary: Mapping[str, Any], save_scores: bool) -> None:
    world = len(owned)
    if world > 1:
        metadata = {"total_size": summary.get("total_scored", 0)}
        write_index(staging, {name: shard_name(rank, world) for rank, names in enumerate(owned) for name in names},
                    metadata)
        if save_scores:
            write_index(staging, {name: shard_name(rank, world, "scores") for rank, names in enumerate(owned)
                                  for name in names}, metadata, index_file=SCORES_INDEX_FILE)
    write_json(staging / SUMMARY_FILE, summary)
