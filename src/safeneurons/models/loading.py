"""Load the models we study: a local HF folder, an HF id, an alias of the original work, or `demo`."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from safeneurons.errors import SafeneuronsError
from safeneurons.models.structure import check_architecture, check_architecture_config
from safeneurons.runtime.checkpoints import CheckpointFiles, check_safetensors, check_same_tensors
from safeneurons.runtime.hub import hub_unreachable, offline_requested
from safeneurons.runtime.zero3 import gathered_state_dict, is_zero3_partitioned, zero3_init_context


def local_model_folder(name: str, cache_dir: str | None = None) -> Path:
    """The local folder holding a model's files, named as the model names its parameters: a folder, `demo`, or an
    HF id found in the local cache (a checkpoint that stores its experts apart: its fused copy, models.fused)."""
    from safeneurons.models.fused import fused_folder

    check_model_name(name)
    resolved = resolve_model_name(name, cache_dir)
    if Path(resolved).is_dir():
        return fused_folder(Path(resolved), cache_dir)
    from huggingface_hub import snapshot_download

    try:
        return fused_folder(Path(snapshot_download(resolved, cache_dir=cache_dir, local_files_only=True)), cache_dir)
    except SafeneuronsError:
        raise
    except Exception:  # huggingface_hub raises several types for "not in the cache"
        raise SafeneuronsError(f"model {name!r} is neither a local folder nor in the HF cache (its safetensors "
                               f"files are read directly): download it (`huggingface-cli download {resolved} "
                               f"--local-dir DIR`) and pass DIR") from None


log = logging.getLogger(__name__)

ALIASES = {
    "llama2-7b-chat-hf": "meta-llama/Llama-2-7b-chat-hf",
    "llama2-13b-chat-hf": "meta-llama/Llama-2-13b-chat-hf",
    "llama2-70b-chat-hf": "meta-llama/Llama-2-70b-chat-hf",
    "llama2-7b-hf": "meta-llama/Llama-2-7b-hf",
    "llama2-13b-hf": "meta-llama/Llama-2-13b-hf",
    "llama2-70b-hf": "meta-llama/Llama-2-70b-hf",
}
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
DEMO_ASSETS = Path(__file__).resolve().parent.parent / "demo" / "assets"  # shipped in the package
DEMO_NAME = "demo"  # demo-chat
DEMO_CHAT_NAME = "demo-chat"
DEMO_BASE_NAME = "demo-base"  # the unaligned base model demo-chat was aligned from (demo.py)
DEMO_JUDGE_NAME = "demo-judge"  # the demo's HarmBench-format classifier (demo_judge.py)
DEMO_MOE_NAME = "demo-moe"  # demo-moe-chat, the mixture-of-experts demo pair's chat model (demo/moe.py)
DEMO_MOE_CHAT_NAME = "demo-moe-chat"
DEMO_MOE_BASE_NAME = "demo-moe-base"
BUILT_IN_FOLDERS = {DEMO_NAME: "chat", DEMO_CHAT_NAME: "chat", DEMO_BASE_NAME: "base", DEMO_JUDGE_NAME: "judge",
                    DEMO_MOE_NAME: "moe_chat", DEMO_MOE_CHAT_NAME: "moe_chat", DEMO_MOE_BASE_NAME: "moe_base"}


def demo_model_dir(which: str = "chat") -> Path:
    """The built-in demo chat (or base) model's folder inside the installed package."""
    return DEMO_ASSETS / which


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise SafeneuronsError(f"dtype {name!r} is not one of {', '.join(sorted(DTYPES))}") from None


def resolve_model_name(name: str, cache_dir: str | None = None) -> str:
    """A local folder or the demo model's folder as a path string (a GGUF file's de-quantized folder, made on first
    use under `cache_dir` or the HF cache); otherwise the HF id (aliases expanded)."""
    from safeneurons.models.adapters import ADAPTER_ALIASES, check_adapter, merged_folder
    from safeneurons.models.gguf import dequantized_folder, gguf_file_of

    if name in BUILT_IN_FOLDERS:
        return str(DEMO_ASSETS / BUILT_IN_FOLDERS[name])
    if name in ADAPTER_ALIASES:
        check_adapter(name)  # before the base model is de-quantized
        base = Path(resolve_model_name(ADAPTER_ALIASES[name][0], cache_dir))
        return str(merged_folder(name, base, cache_dir))
    gguf = gguf_file_of(name)
    if gguf is not None:
        return str(dequantized_folder(gguf, cache_dir))
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    return ALIASES.get(name, name)


def check_model_name(name: str, what: str = "model") -> None:
    """Refuse a name that is no folder, no built-in name or alias, and cannot be an HF id (`org/name`)."""
    from safeneurons.models.adapters import ADAPTER_ALIASES
    from safeneurons.models.gguf import GGUF_ALIASES, gguf_file_of

    if name in ADAPTER_ALIASES or gguf_file_of(name) is not None:
        return
    resolved = resolve_model_name(name)
    if not Path(resolved).is_dir() and looks_like_path(name):
        raise SafeneuronsError(f"{what} folder {name} does not exist (no such folder)")
    if not Path(resolved).is_dir() and resolved.count("/") != 1:
        known = ", ".join([*BUILT_IN_FOLDERS, *ALIASES, *GGUF_ALIASES, *ADAPTER_ALIASES])
        raise SafeneuronsError(f"{what} {name!r} is not a local folder, a built-in name or alias ({known}) nor an "
                               f"HF id (org/name)")


def looks_like_path(name: str) -> bool:
    """A name meant as a local folder rather than an HF id (`org/name`): absolute, relative with ./ or ../, from
    ~, ending in /, or of more than two parts."""
    return (name.startswith(("/", "./", "../", "~", ".\\")) or name.endswith(("/", os.sep)) or name in (".", "..")
            or name.count("/") > 1)


def _from_pretrained(loader: Any, name: str, what: str, cache_dir: str | None, **kwargs: Any) -> Any:
    """Load from the local cache first; go online only when that fails and HF_HUB_OFFLINE is not set."""
    check_model_name(name, what)
    resolved = resolve_model_name(name, cache_dir)
    local = Path(resolved).is_dir()
    error: Exception | str | None = None
    for local_only in [True] if local or offline_requested() else [True, False]:
        unreachable = None if local_only else hub_unreachable()
        if unreachable:
            error = unreachable
            break
        try:
            return loader.from_pretrained(resolved, cache_dir=cache_dir, local_files_only=local_only, **kwargs)
        except (OSError, ValueError) as caught:
            error = caught
    where = f"folder {resolved}" if local else f"{resolved!r}" + (f" (alias of {name!r})" if resolved != name else "")
    hint = ("" if local else
            f"; download it where there is network (`huggingface-cli download {resolved} --local-dir DIR`) "
            f"and pass --model DIR, or point --cache_dir/HF_HOME at a cache that holds it")
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise SafeneuronsError(f"{what} {where} is not available locally and could not be loaded ({first_line}){hint}")


def load_tokenizer(name: str, cache_dir: str | None = None) -> Any:
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, name, "tokenizer of model", cache_dir)
    if tokenizer.pad_token is None:  # Llama-2 has none; padding reuses EOS, attention masks hide it
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(name: str, cache_dir: str | None = None) -> Any:
    """The model's HF config (layer count, widths) without loading weights; unsupported architectures refused."""
    from transformers import AutoConfig

    config = _from_pretrained(AutoConfig, name, "model", cache_dir)
    check_architecture_config(config, name)
    return config


def model_skeleton(name: str, cache_dir: str | None = None) -> nn.Module:
    """The model built on the meta device from its config: every parameter's name and shape, no weights read."""
    from transformers import AutoModelForCausalLM

    config = load_config(name, cache_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_model(name: str, dtype: str | torch.dtype = "float32", cache_dir: str | None = None,
               device: str | torch.device | None = None, ds_config: dict | None = None) -> nn.Module:
    """A causal LM of a supported architecture, in `dtype`, partitioned under ZeRO-3 when `ds_config` asks."""
    from transformers import AutoModelForCausalLM

    load_config(name, cache_dir)  # refuses an unsupported architecture before any weight is read
    folder = Path(resolve_model_name(name, cache_dir))
    if folder.is_dir():
        check_safetensors(folder)
    with zero3_init_context(ds_config):
        model = _from_pretrained(AutoModelForCausalLM, name, "model", cache_dir, dtype=parse_dtype(dtype))
    check_architecture(model)
    if device is not None and not is_zero3_partitioned(model):
        model.to(device)
    model.eval()
    return model


def load_model_and_tokenizer(name: str, dtype: str | torch.dtype = "float32", cache_dir: str | None = None,
                             device: str | torch.device | None = None,
                             ds_config: dict | None = None) -> tuple[nn.Module, Any]:
    return load_model(name, dtype, cache_dir, device, ds_config), load_tokenizer(name, cache_dir)


SHARD_MODES = ("none", "layers")  # how a model is held: whole (or ZeRO-3 partitioned), or one block per rank


@dataclass(frozen=True)
class ModelSource:
    """Which model a stage runs and how it is held: a folder, HF id, alias or `demo`, in `dtype`, partitioned under
    a ZeRO-3 `deepspeed` config or whole on every rank."""

    name: str
    dtype: str = "float32"
    deepspeed: str | None = None
    cache_dir: str | None = None
    shard: str = "none"  # "layers": each rank holds one block of decoder layers (models.blocks)
    stages: int | None = None  # with shard "layers": pipeline stages (None: the ranks of a node); the rest replicate

    def check(self) -> None:
        """The holding asked is possible: before any process group or weight."""
        if self.shard not in SHARD_MODES:
            raise SafeneuronsError(f"--shard {self.shard!r} is not one of {', '.join(SHARD_MODES)}")
        if self.stages is not None and (self.shard != "layers" or self.stages < 1):
            raise SafeneuronsError(f"--stages {self.stages}: expected a positive number of pipeline stages, with "
                                   f"--shard layers")
        if self.shard == "layers" and self.deepspeed is not None:
            raise SafeneuronsError(f"--shard layers holds each layer on one rank; --deepspeed {self.deepspeed} would "
                                   f"partition every layer over all of them: give one or the other")

    def load(self, device: torch.device | None = None) -> LoadedModel:
        """Collective under ZeRO-3: see `load_for_inference` (layer-sharded: `models.blocks.load_source`)."""
        if self.shard != "none":
            raise SafeneuronsError(f"--shard {self.shard}: load with models.blocks.load_source")
        return load_for_inference(self.name, self.dtype, self.deepspeed, self.cache_dir, device)

    def provenance(self) -> dict | None:
        """Where the weights came from when they were de-quantized from a GGUF file (file, SHA-256, quantization
        types) or merged from a shipped adapter (which, over which base); None for a plain checkpoint."""
        from safeneurons.models.adapters import adapter_source
        from safeneurons.models.gguf import gguf_source

        folder = resolve_model_name(self.name, self.cache_dir)
        return adapter_source(folder) or gguf_source(folder)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    engine: Any = None  # the DeepSpeed engine whose hooks gather the ZeRO-3 weights (kept alive with the model)


def load_for_inference(name: str, dtype: str | torch.dtype = "float32", deepspeed_config: str | dict | None = None,
                       cache_dir: str | None = None, device: torch.device | None = None) -> LoadedModel:
    """Load for scoring, patching and tracing. With a ZeRO-3 config the model is partitioned across the ranks and
    wrapped in an inference engine (no optimizer) whose hooks gather each layer's weights for forward and backward;
    otherwise every rank holds the whole model on `device`."""
    from safeneurons.runtime import distributed
    from safeneurons.runtime.dsconfig import fill_config, read_config, zero_stage

    ds_config = None
    if deepspeed_config is not None:
        ds_config = read_config(deepspeed_config)  # a training config serves too: its optimizer is left out
        ds_config = fill_config({key: value for key, value in ds_config.items() if key not in ("optimizer", "scheduler")},
                                world_size=distributed.world_size(), dtype=parse_dtype(dtype),
                                hidden_size=getattr(load_config(name, cache_dir), "hidden_size", None))
        if zero_stage(ds_config) != 3:
            log.warning("DeepSpeed config is not ZeRO-3: every rank holds the whole model")
            ds_config = None
    model = load_model(name, dtype, cache_dir, device, ds_config)
    tokenizer = load_tokenizer(name, cache_dir)
    if ds_config is None:
        return LoadedModel(model, tokenizer)
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    return LoadedModel(engine.module, tokenizer, engine)


def save_hf_folder(model: nn.Module, tokenizer: Any, out: str | os.PathLike,
                   json_files: dict[str, Any] | None = None) -> None:
    """Collective: the model (gathered under ZeRO-3), its tokenizer and `json_files` (name -> payload) written by
    rank 0 as an HF folder that `from_pretrained` loads, staged and then moved into place."""
    from safeneurons.runtime import distributed
    from safeneurons.runtime.outputs import staged, write_json

    state = gathered_state_dict(model)
    problem = ""
    if distributed.is_main():
        try:
            with staged(out) as staging:
                # experts fused as in memory: file-level stages read parameters by their names (models.fused)
                model.save_pretrained(staging, state_dict=state, save_original_format=False)
                tokenizer.save_pretrained(staging)
                for name, payload in (json_files or {}).items():
                    write_json(staging / name, payload)
        except OSError as error:
            problem = f"cannot write the model to {out}: {error}"
    distributed.all_ranks_ok(not problem, problem)  # the ranks finish together: none exits while rank 0 writes


def open_matching_checkpoints(models: dict[str, str], cache_dir: str | None = None) -> list[CheckpointFiles]:
    """The safetensors files of each model ({option: model}, the first the reference), checked from the file headers
    to hold the same tensors as the reference; the error names the two options and the first misfit."""
    (reference_option, reference), *others = models.items()
    opened = [CheckpointFiles(local_model_folder(reference, cache_dir))]
    for option, model in others:
        opened.append(CheckpointFiles(local_model_folder(model, cache_dir)))
        check_same_tensors(opened[0], opened[-1], reference_option, option)
    return opened
