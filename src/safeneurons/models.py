"""Load the models we study: a local HF folder, an HF id, an alias of the original work, or `demo`."""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .errors import SafeneuronsError

log = logging.getLogger(__name__)

ALIASES = {
    "llama2-7b-chat-hf": "meta-llama/Llama-2-7b-chat-hf",
    "llama2-13b-chat-hf": "meta-llama/Llama-2-13b-chat-hf",
    "llama2-70b-chat-hf": "meta-llama/Llama-2-70b-chat-hf",
    "llama2-7b-hf": "meta-llama/Llama-2-7b-hf",
    "llama2-13b-hf": "meta-llama/Llama-2-13b-hf",
    "llama2-70b-hf": "meta-llama/Llama-2-70b-hf",
}
# Support is decided by structure, not by model type: decoder layers at `model.layers`, each with an attention
# block (separate q/k/v projections or one fused qkv_proj, and o_proj) and an MLP (gate and up projections or one
# fused gate_up_proj, and down_proj). Llama, Mistral, Qwen2/3, Gemma-2/3 and Phi-3 have it.
ATTENTION_LAYOUTS = (("q_proj", "k_proj", "v_proj"), ("qkv_proj",))
MLP_LAYOUTS = (("gate_proj", "up_proj"), ("gate_up_proj",))
BLOCK_OUTPUTS = {"self_attn": "o_proj", "mlp": "down_proj"}
EXPECTED_LAYOUT = ("decoder layers at model.layers with self_attn.{q,k,v}_proj (or qkv_proj) and o_proj, and "
                   "mlp.{gate,up}_proj (or gate_up_proj) and down_proj")
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
DEMO_NAME = "demo"  # demo-chat
DEMO_CHAT_NAME = "demo-chat"
DEMO_BASE_NAME = "demo-base"  # the unaligned base model demo-chat was aligned from (demo.py)
DEMO_JUDGE_NAME = "demo-judge"  # the demo's HarmBench-format classifier (demo_judge.py)


def demo_model_dir(which: str = "chat") -> Path:
    """The built-in demo chat (or base) model's folder inside the installed package."""
    return Path(__file__).resolve().parent / "demo_assets" / which


def demo_judge_dir() -> Path:
    return Path(__file__).resolve().parent / "demo_judge_assets"


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise SafeneuronsError(f"dtype {name!r} is not one of {', '.join(sorted(DTYPES))}") from None


def resolve_model_name(name: str) -> str:
    """A local folder or the demo model's folder as a path string; otherwise the HF id (aliases expanded)."""
    if name in (DEMO_NAME, DEMO_CHAT_NAME):
        return str(demo_model_dir())
    if name == DEMO_BASE_NAME:
        return str(demo_model_dir("base"))
    if name == DEMO_JUDGE_NAME:
        return str(demo_judge_dir())
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    return ALIASES.get(name, name)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def looks_like_path(name: str) -> bool:
    """A name meant as a local folder rather than an HF id (`org/name`): absolute, relative with ./ or ../, from
    ~, ending in /, or of more than two parts."""
    return (name.startswith(("/", "./", "../", "~", ".\\")) or name.endswith(("/", os.sep)) or name in (".", "..")
            or name.count("/") > 1)


def _from_pretrained(loader: Any, name: str, what: str, cache_dir: str | None, **kwargs: Any) -> Any:
    """Load from the local cache first; go online only when that fails and HF_HUB_OFFLINE is not set."""
    resolved = resolve_model_name(name)
    if not Path(resolved).is_dir() and looks_like_path(name):
        raise SafeneuronsError(f"{what} folder {name} does not exist (no such folder)")
    local = Path(resolved).is_dir()
    attempts = [True] if local or _offline() else [True, False]
    error: Exception | None = None
    for local_only in attempts:
        try:
            return loader.from_pretrained(resolved, cache_dir=cache_dir, local_files_only=local_only, **kwargs)
        except (OSError, ValueError) as caught:
            error = caught
    where = f"folder {resolved}" if local else f"{resolved!r}" + (f" (alias of {name!r})" if resolved != name else "")
    hint = ("" if local else
            f"; download it where there is network (`huggingface-cli download {resolved} --local-dir DIR`) "
            f"and pass --model DIR, or point --cache_dir/HF_HOME at a cache that holds it")
    first_line = str(error).strip().splitlines()[0] if error and str(error).strip() else type(error).__name__
    raise SafeneuronsError(f"{what} {where} is not available locally and could not be loaded ({first_line}){hint}")


def load_tokenizer(name: str, cache_dir: str | None = None) -> Any:
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, name, "tokenizer of model", cache_dir)
    if tokenizer.pad_token is None:  # Llama-2 has none; padding reuses EOS, attention masks hide it
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextlib.contextmanager
def zero3_init_context(ds_config: dict | None) -> Iterator[None]:
    """While active, `from_pretrained` builds the model partitioned across ranks (deepspeed.zero.Init)."""
    if not ds_config or ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    hf_config = HfDeepSpeedConfig(ds_config)  # transformers checks for this object while it is alive
    try:
        yield
    finally:
        del hf_config


def load_config(name: str, cache_dir: str | None = None) -> Any:
    """The model's HF config (layer count, widths) without loading weights; unsupported architectures refused."""
    from transformers import AutoConfig

    config = _from_pretrained(AutoConfig, name, "model", cache_dir)
    check_architecture_config(config, name)
    return config


def forward_row_bytes(hidden: int, intermediate: int, heads: int, length: int, element: int,
                      eager_attention: bool) -> int:
    """Peak bytes one sequence of `length` tokens adds to a no-grad forward without KV cache, measured on
    transformers' Llama (tests/test_plan.py): the MLP's working set, 4h + 3I elements per token (the residual, the
    normed input, the activated gate, up and their product), or — with eager attention, which materialises the
    scores — ≈ 6h elements plus 3 elements and an fp32 softmax value per head and key (the scores, their scaled and
    masked copies); SDPA keeps no scores. `patch` sizes its batches with it and `plan` counts with it."""
    mlp = element * (4 * hidden + 3 * intermediate)
    attention = element * 6 * hidden + (heads * length * (3 * element + 4) if eager_attention else 0)
    return length * max(mlp, attention)


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
    from . import distributed
    from .dsconfig import fill_config, read_config, zero_stage

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


def check_architecture_config(config: Any, name: str = "") -> None:
    """Refuse, before any weight is read, a config whose model lacks the decoder structure (checked on the model
    built on the meta device)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as error:
        raise SafeneuronsError(f"model {name or '?'} (architecture {getattr(config, 'model_type', None)!r}) is not a "
                               f"causal LM transformers can build ({str(error).splitlines()[0]})") from None
    check_architecture(skeleton, name)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks (`model.model.layers`)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise SafeneuronsError(f"{type(model).__name__} has no decoder layers at model.layers; expected "
                               f"{EXPECTED_LAYOUT}")
    return layers


def layer_projections(layer: nn.Module) -> list[tuple[str, nn.Linear]] | None:
    """The projections of one decoder layer in data order (inputs, then output, of attention then MLP), named
    like "self_attn.q_proj"; None when the layer does not have the structure."""
    found = []
    for parent_name, layouts in (("self_attn", ATTENTION_LAYOUTS), ("mlp", MLP_LAYOUTS)):
        parent = getattr(layer, parent_name, None)
        names = next((layout for layout in layouts
                      if all(isinstance(getattr(parent, name, None), nn.Linear) for name in layout)), None)
        output = BLOCK_OUTPUTS[parent_name]
        if names is None or not isinstance(getattr(parent, output, None), nn.Linear):
            return None
        found += [(f"{parent_name}.{name}", getattr(parent, name)) for name in (*names, output)]
    return found


def check_architecture(model: nn.Module, name: str = "") -> None:
    """Every decoder layer must have the Linear projections we score, freeze and patch."""
    for index, layer in enumerate(decoder_layers(model)):
        if layer_projections(layer) is None:
            raise SafeneuronsError(f"model {name or type(model).__name__}: layer {index} does not have the structure "
                                   f"safeneurons works on; expected {EXPECTED_LAYOUT}")


def head_dim(config: Any) -> int:
    """The attention head width as the model uses it: the config's head_dim when set, else hidden / heads."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def fused_parts(name: str, config: Any) -> dict[str, slice] | None:
    """The output rows of each part of a fused projection ("self_attn.qkv_proj": q, k, v; "mlp.gate_up_proj": gate,
    up), None for a projection that is not fused."""
    if name.endswith("gate_up_proj"):
        width = int(config.intermediate_size)
        return {"gate": slice(0, width), "up": slice(width, 2 * width)}
    if name.endswith("qkv_proj"):
        heads = int(config.num_attention_heads)
        kv_width = int(getattr(config, "num_key_value_heads", None) or heads) * head_dim(config)
        q_width = heads * head_dim(config)
        return {"q": slice(0, q_width), "k": slice(q_width, q_width + kv_width),
                "v": slice(q_width + kv_width, q_width + 2 * kv_width)}
    return None


SPLIT_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "gate": "mlp.gate_proj",
               "up": "mlp.up_proj"}


def split_fused(tensors: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """One layer's tensors by short name with fused projections replaced by views of their parts, named like the
    separate projections ("self_attn.q_proj", ...): code written for q/k/v and gate/up works on both layouts, and
    writes into the views land in the fused tensors."""
    split = {}
    for name, tensor in tensors.items():
        parts = fused_parts(name, config)
        split.update({SPLIT_NAMES[part]: tensor[rows] for part, rows in parts.items()} if parts else {name: tensor})
    return split


@dataclass(frozen=True)
class ScoredLinear:
    """One Linear inside a decoder layer: the unit of scoring, masking and freezing."""

    layer: int
    name: str  # e.g. "self_attn.q_proj"
    param_name: str  # full parameter name, e.g. "model.layers.3.self_attn.q_proj.weight"
    module: nn.Linear
    config: Any = field(default=None, compare=False, repr=False)  # the model's config (sizes of fused parts)


def scored_linears(model: nn.Module, layer: int | None = None) -> list[ScoredLinear]:
    """The Linears we score, in layer order (one layer if `layer` is given); never embeddings, norms, lm_head."""
    check_architecture(model)
    names = {id(module): name for name, module in model.named_modules()}
    found = []
    for index, block in enumerate(decoder_layers(model)):
        if layer is not None and index != layer:
            continue
        found += [ScoredLinear(index, name, f"{names[id(module)]}.weight", module, getattr(model, "config", None))
                  for name, module in layer_projections(block)]
    return found


@contextlib.contextmanager
def layers_from(model: nn.Module, start: int, stop: int | None = None) -> Iterator[None]:
    """While active, the model's forward runs decoder layers [start, stop) only, from `inputs_embeds` = the
    hidden states entering layer `start` (rotary positions and the causal mask are rebuilt as usual)."""
    if start == 0 and stop is None:
        yield
        return
    inner = model.model
    every = inner.layers
    inner.layers = nn.ModuleList(list(every)[start:stop])
    try:
        yield
    finally:
        inner.layers = every


def is_zero3_partitioned(model: nn.Module) -> bool:
    return any(hasattr(param, "ds_id") for param in model.parameters())


def model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def gathered_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full state dict on rank 0 (None elsewhere), gathered parameter by parameter under ZeRO-3."""
    from . import distributed

    if not is_zero3_partitioned(model):
        if not distributed.is_main():
            return None
        return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if distributed.is_main():
                state[name] = param.data.detach().cpu().clone()
    if distributed.is_main():
        state.update({name: buffer.detach().cpu() for name, buffer in model.named_buffers()
                      if name in model.state_dict()})
    return state if distributed.is_main() else None


def save_hf_folder(model: nn.Module, tokenizer: Any, out: str | os.PathLike,
                   json_files: dict[str, Any] | None = None) -> None:
    """Collective: the model (gathered under ZeRO-3), its tokenizer and `json_files` (name -> payload) written by
    rank 0 as an HF folder that `from_pretrained` loads, staged and then moved into place."""
    from . import distributed
    from .outputs import discard_staging, publish_dir, staging_dir, write_json

    state = gathered_state_dict(model)
    problem = ""
    if distributed.is_main():
        staging = staging_dir(out, fresh=True)
        try:
            model.save_pretrained(staging, state_dict=state)
            tokenizer.save_pretrained(staging)
            for name, payload in (json_files or {}).items():
                write_json(staging / name, payload)
            publish_dir(out)
        except OSError as error:
            discard_staging(out)
            problem = f"cannot write the model to {out}: {error}"
    distributed.all_ranks_ok(not problem, problem)  # the ranks finish together: none exits while rank 0 writes
