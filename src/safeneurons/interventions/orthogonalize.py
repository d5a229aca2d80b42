"""Weight orthogonalization (Arditi et al. 2024): W ← W − r̂ r̂ᵀ W for every matrix that writes to the residual
stream — the token embeddings (each row) and every `o_proj` / `down_proj` (each output column), the shared experts'
and every routed expert's `down_proj` of an MoE, with their biases where an architecture has them — so that the
model can no longer write along r̂: the same model as directional ablation at every position, in its weights.

Tied embeddings are untied first (the unembedding keeps the original matrix: only what writes to the residual
changes). Architectures that normalise each block's output before adding it (Gemma-2/3's post-norms scale every
coordinate) cannot be orthogonalized in their weights, and are refused: use ablation there.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file
from torch import nn

from safeneurons.errors import SafeneuronsError
from safeneurons.models.fused import fused_folder
from safeneurons.models.loading import model_skeleton
from safeneurons.models.structure import decoder_layers, transposed_experts
from safeneurons.runtime.checkpoints import INDEX_FILE, WEIGHTS_FILE, CheckpointFiles, rewrite_checkpoint

# o_proj, the dense MLP's and the shared experts' down_proj (weight, bias), the routed experts' fused down_proj (and
# GPT-OSS's down_proj_bias)
WRITES = re.compile(r"(^|\.)((self_attn\.o_proj|mlp\.(shared_experts?\.)?down_proj)\.(weight|bias)"
                    r"|mlp\.experts\.down_proj(_bias)?)$")
EMBEDDING = re.compile(r"(^|\.)embed_tokens\.weight$")
UNTIED_FILE = "model-lm_head.safetensors"


@dataclass
class OrthogonalizeResult:
    edited: list[str]  # the tensors changed
    untied: bool  # the unembedding was tied to the embeddings and now holds its own copy

    def to_json(self) -> dict[str, Any]:
        return {"edited": self.edited, "n_edited": len(self.edited), "untied_embeddings": self.untied}


def check_orthogonalizable(config: Any) -> None:
    """Refuse architectures with post-norms (the config object or config.json's mapping)."""
    model_type = str(config.get("model_type", "") if isinstance(config, Mapping) else getattr(config, "model_type", ""))
    if model_type.startswith(("gemma2", "gemma3")):
        raise SafeneuronsError(f"{model_type} normalises each block's output before the residual add (its "
                               f"post-norms rescale every coordinate), so no weight edit removes the direction: use "
                               f"directional ablation (the direction stage's hooks) for this model")


def orthogonal_tensor(name: str, tensor: torch.Tensor, unit: torch.Tensor, mask: torch.Tensor | None = None,
                      transposed: bool = False) -> torch.Tensor:
    """The tensor with r̂ projected out of what it writes (computed in float64, stored in its dtype); with `mask`,
    only the masked elements change. A routed experts' down_proj is E matrices: each expert's output rows, read
    through `transposed` for experts stored [E, in, out] (models.moe)."""
    values = tensor.double()
    r = unit.double().to(values.device)
    if EMBEDDING.search(name) or (tensor.dim() == 2 and name.endswith("experts.down_proj_bias")):
        projected = values - (values @ r)[:, None] * r[None, :]
    elif tensor.dim() == 3:
        canonical = values.transpose(1, 2) if transposed else values  # [E, hidden, intermediate]
        canonical = canonical - r[None, :, None] * (r @ canonical)[:, None, :]
        projected = canonical.transpose(1, 2) if transposed else canonical
    elif name.endswith(".weight"):
        projected = values - r[:, None] * (r @ values)[None, :]
    else:
        projected = values - (values @ r) * r
    if mask is not None:
        projected = torch.where(mask.to(values.device), projected, values)
    return projected.to(tensor.dtype)


def is_write(name: str) -> bool:
    return bool(WRITES.search(name) or EMBEDDING.search(name))


def orthogonalize_model(model: nn.Module, direction: torch.Tensor,
                        masks: Mapping[str, torch.Tensor] | None = None) -> OrthogonalizeResult:
    """In place, in memory; with `masks`, only the masked elements of the written matrices (the embeddings are
    then left alone)."""
    check_orthogonalizable(model.config)
    decoder_layers(model)
    unit = direction.detach().double().flatten() / direction.detach().double().norm()
    untied = False
    if masks is None and model.config.tie_word_embeddings and model.get_output_embeddings() is not None:
        output = model.get_output_embeddings()
        output.weight = nn.Parameter(output.weight.detach().clone(), requires_grad=output.weight.requires_grad)
        model.config.tie_word_embeddings, untied = False, True
    edited = []
    transposed = transposed_experts(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not is_write(name) or (masks is not None and name not in masks):
                continue
            parameter.copy_(orthogonal_tensor(name, parameter, unit, None if masks is None else masks[name],
                                              name in transposed))
            edited.append(name)
    return OrthogonalizeResult(edited, untied)


def orthogonalize_files(folder: Path, direction: torch.Tensor, out: Path) -> OrthogonalizeResult:
    """The streaming form: the checkpoint rewritten shard by shard into `out` (an existing empty folder); a tied
    unembedding is written to its own shard with an index, and config.json says it is no longer tied. An MoE
    checkpoint that stores its experts apart is read through its fused copy (models.fused)."""
    folder = fused_folder(Path(folder))
    config = json.loads((folder / "config.json").read_text())
    check_orthogonalizable(config)
    unit = direction.detach().double().flatten() / direction.detach().double().norm()
    files = CheckpointFiles(folder)
    transposed = transposed_experts(model_skeleton(str(folder)))
    edited: list[str] = []
    embedding: dict[str, torch.Tensor] = {}

    def edit(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if EMBEDDING.search(name):
            embedding[name] = tensor.clone()
        if not is_write(name):
            return tensor
        edited.append(name)
        return orthogonal_tensor(name, tensor, unit, transposed=name in transposed)

    rewrite_checkpoint(files, out, edit)
    tied = bool(config.get("tie_word_embeddings", False)) and "lm_head.weight" not in files.weight_map and embedding
    if tied:
        untie_files(files, out, next(iter(embedding.values())), config)
    return OrthogonalizeResult(edited, bool(tied))


def untie_files(files: CheckpointFiles, out: Path, unembedding: torch.Tensor, config: dict) -> None:
    """The unembedding as its own shard, listed in the index (a single weights file becomes shard 1 of 2: loaders
    read model.safetensors alone when it exists), and config.json no longer tied."""
    weight_map = {name: path.name for name, path in files.weight_map.items()}
    if (out / WEIGHTS_FILE).is_file() and not (files.folder / INDEX_FILE).is_file():
        first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
        (out / WEIGHTS_FILE).rename(out / first)
        weight_map = {name: first for name in weight_map}
    else:
        second = UNTIED_FILE
    save_file({"lm_head.weight": unembedding.contiguous()}, str(out / second))
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": {**weight_map, "lm_head.weight": second}},
                                             indent=2))
    (out / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}, indent=2))

