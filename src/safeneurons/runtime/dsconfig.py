"""DeepSpeed configs: load a JSON file and fill its "auto" values from the command's own arguments."""
from __future__ import annotations

import copy
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from safeneurons.errors import SafeneuronsError

log = logging.getLogger(__name__)

AUTO = "auto"
CPU_COMM_OP = "deepspeed_shm_comm"  # DeepSpeed's shared-memory collectives on CPU, compiled at first use


def prepare_cpu_comm_op() -> None:
    """On CPU, DeepSpeed compiles its shared-memory communication op the first time it starts (25–40 s). Build it
    once per Python environment (torch's extension folder inside the environment, when writable, so that two
    environments with different torch versions do not rebuild each other's) and say so in the log, once."""
    if torch.cuda.is_available():
        return
    if "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "share" / "safeneurons" /
                                                 f"torch-{torch.__version__}-extensions")
    folder = os.environ.get("TORCH_EXTENSIONS_DIR")
    if folder and not (Path(folder) / CPU_COMM_OP / f"{CPU_COMM_OP}.so").exists() and \
            os.environ.get("RANK", "0") == "0":
        log.info("DeepSpeed builds its CPU communication op into %s (once for this environment, about 30 s)", folder)


def read_config(source: str | Path | dict) -> dict:
    if isinstance(source, dict):
        return copy.deepcopy(source)
    path = Path(source)
    if not path.is_file():
        raise SafeneuronsError(f"DeepSpeed config {source} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SafeneuronsError(f"DeepSpeed config {source} is not valid JSON (line {error.lineno}: {error.msg})") from None


def _set_auto(section: dict, key: str, value: Any) -> None:
    if section.get(key) == AUTO:
        if value is None:
            section.pop(key)
        else:
            section[key] = value


def fill_config(source: str | Path | dict, *, micro_batch_size: int = 1, gradient_accumulation_steps: int = 1,
                world_size: int = 1, learning_rate: float | None = None, weight_decay: float | None = None,
                gradient_clipping: float | None = None, dtype: torch.dtype | None = None,
                hidden_size: int | None = None) -> dict:
    """A DeepSpeed config with every "auto" replaced by the value the command was given. Every stage that starts
    DeepSpeed fills its config first: the CPU communication op is prepared here."""
    prepare_cpu_comm_op()
    config = read_config(source)
    _set_auto(config, "train_micro_batch_size_per_gpu", micro_batch_size)
    _set_auto(config, "gradient_accumulation_steps", gradient_accumulation_steps)
    _set_auto(config, "train_batch_size", micro_batch_size * gradient_accumulation_steps * world_size)
    _set_auto(config, "gradient_clipping", gradient_clipping if gradient_clipping else 0.0)
    for precision, wanted in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if precision in config:
            _set_auto(config[precision], "enabled", dtype == wanted)
    params = config.get("optimizer", {}).get("params", {})
    _set_auto(params, "lr", learning_rate)
    _set_auto(params, "weight_decay", weight_decay)
    for key in ("warmup_max_lr",):
        _set_auto(config.get("scheduler", {}).get("params", {}), key, learning_rate)
    zero = config.get("zero_optimization", {})
    if hidden_size:
        _set_auto(zero, "reduce_bucket_size", hidden_size * hidden_size)
        _set_auto(zero, "stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
        _set_auto(zero, "stage3_param_persistence_threshold", 10 * hidden_size)
    leftover = _find_auto(config)
    if leftover:
        raise SafeneuronsError(f"DeepSpeed config value {leftover} is 'auto' and no argument of this command sets it")
    return config


def _find_auto(node: Any, path: str = "") -> str | None:
    if isinstance(node, dict):
        for key, value in node.items():
            found = _find_auto(value, f"{path}.{key}" if path else key)
            if found:
                return found
    return path if node == AUTO else None


def zero_stage(config: dict | None) -> int:
    return int((config or {}).get("zero_optimization", {}).get("stage", 0))
