"""Models shipped as a LoRA adapter over another model (`smollm2-safe` over SmolLM2-135M-Instruct): merged once
by PEFT into a cached HF folder (float32 safetensors, keyed by the adapter's and the base's hashes), which every
stage then loads like any folder. `adapter_source.json` in that folder records what was merged."""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

from safeneurons.errors import SafeneuronsError

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "demo" / "assets"
# alias -> (the base model's name, the adapter's folder)
ADAPTER_ALIASES = {"smollm2-safe": ("smollm2-135m-instruct", ASSETS / "smollm2_safe")}
ADAPTER_FILE = "adapter_model.safetensors"
SOURCE_FILE = "adapter_source.json"


def adapter_digest(folder: Path) -> str:
    """SHA-256 of the adapter's weights and config, once per process and version of the files (every stage
    resolves the alias several times)."""
    files = [folder / name for name in (ADAPTER_FILE, "adapter_config.json")]
    return _digest(tuple(str(path) for path in files), tuple(path.stat().st_mtime_ns for path in files))


@functools.lru_cache(maxsize=8)
def _digest(paths: tuple[str, ...], mtimes_ns: tuple[int, ...]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def check_adapter(name: str) -> Path:
    """The adapter folder of alias `name`; one clear error when it is missing."""
    adapter = ADAPTER_ALIASES[name][1]
    if not (adapter / ADAPTER_FILE).is_file():
        raise SafeneuronsError(f"{name}'s adapter is not in {adapter}: rebuild it with python -m safeneurons.demo "
                               f"build-smollm2-safe --align FILE --out {adapter}")
    return adapter


def merged_folder(name: str, base: Path, cache_dir: str | None = None) -> Path:
    """The cached folder of `name`'s base (the resolved folder `base`) with its adapter merged, made on first use
    (staged, then one rename)."""
    from filelock import FileLock

    from safeneurons.models.gguf import cache_root

    base_name, adapter = ADAPTER_ALIASES[name][0], check_adapter(name)
    digest = adapter_digest(adapter)
    key = hashlib.sha256((digest + str(base.name)).encode()).hexdigest()[:16]
    folder = cache_root(cache_dir) / f"{name}-{key}"
    if (folder / SOURCE_FILE).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):  # ranks sharing the cache: one merges, the others wait
        if not (folder / SOURCE_FILE).is_file():
            log.info("merging %s's adapter into %s, once, into %s", name, base_name, folder)
            _write_merged(base, adapter, folder, {"model": name, "base_model": base_name, "base_folder": str(base),
                                                  "adapter": str(adapter), "adapter_sha256": digest})
    return folder


def _write_merged(base: Path, adapter: Path, folder: Path, record: dict) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safeneurons.runtime.outputs import staged

    with staged(folder) as tmp:
        model = AutoModelForCausalLM.from_pretrained(base, dtype="float32")
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        merged.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def adapter_source(folder: str | Path) -> dict | None:
    """What `adapter_source.json` records for a merged folder, with where its base's weights came from (None for
    other folders)."""
    from safeneurons.models.gguf import gguf_source

    record = Path(folder) / SOURCE_FILE
    if not record.is_file():
        return None
    found = json.loads(record.read_text())
    return {**found, "base_source": gguf_source(found["base_folder"])}
