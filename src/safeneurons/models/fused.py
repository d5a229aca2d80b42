"""Checkpoints of mixtures of experts that store each expert apart, made readable by name.

The hub's MoE checkpoints (Mixtral, Qwen2/3-MoE, OLMoE) store one tensor per expert and matrix
(`mlp.experts.3.down_proj.weight`, Mixtral's `block_sparse_moe.experts.3.w2.weight`); transformers 5 fuses them into
3-D parameters when it loads them (its checkpoint conversion mapping). The stages that read or rewrite weights file by
file (`--shard layers`, prune, rewind, compare, the defences, streaming orthogonalization) work with the model's own
parameter names, so such a checkpoint is re-saved once, by transformers itself, with its experts fused
(`save_original_format=False`) into a cached folder beside the GGUF cache; safeneurons writes its own models that way
from the start. The copy is made once per checkpoint (keyed by its files' names and sizes) and needs the memory of
one copy of the model on the CPU.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

from safeneurons.models.gguf import cache_root
from safeneurons.runtime.checkpoints import CheckpointFiles

log = logging.getLogger(__name__)

EXPERT_APART = re.compile(r"\.experts\.\d+\.")  # a tensor of one expert: the hub's layout
FUSED_RECORD = "safeneurons_fused_experts.json"


def stores_experts_apart(folder: Path) -> bool:
    """The folder's safetensors hold one tensor per expert (read from the index or the file header only)."""
    try:
        names = CheckpointFiles(folder).weight_map
    except Exception:  # not a safetensors folder: the stage that reads it says so
        return False
    return any(EXPERT_APART.search(name) for name in names)


def fused_folder(folder: Path, cache_dir: str | None = None) -> Path:
    """`folder` itself, or for a checkpoint that stores its experts apart its cached copy with fused experts, made
    on first use (staged, one rename; ranks or jobs that share the cache wait for the one that converts)."""
    if not stores_experts_apart(folder):
        return folder
    from filelock import FileLock

    files = sorted((item.name, item.stat().st_size) for item in folder.iterdir() if item.is_file())
    digest = hashlib.sha256(json.dumps([str(folder.resolve()), files]).encode()).hexdigest()[:16]
    fused = cache_root(cache_dir).parent / "safeneurons-fused" / f"{folder.name}-{digest}"
    if (fused / FUSED_RECORD).is_file():
        return fused
    fused.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(fused) + ".lock"):
        if not (fused / FUSED_RECORD).is_file():
            log.info("%s stores each expert apart: re-saving it with fused experts into %s, once", folder, fused)
            _write_fused(folder, fused)
    return fused


def _write_fused(folder: Path, fused: Path) -> None:
    from transformers import AutoModelForCausalLM

    from safeneurons.runtime.outputs import staged

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    with staged(fused) as tmp:
        model.save_pretrained(tmp, save_original_format=False)
        for item in folder.iterdir():  # the tokenizer, the chat template, generation settings
            if item.is_file() and not item.name.startswith((".", "model")) and not (tmp / item.name).exists():
                shutil.copy2(item, tmp / item.name)
        (tmp / FUSED_RECORD).write_text(json.dumps({"source": str(folder.resolve())}, indent=2) + "\n")
