"""Shared fixtures: the demo model and tokenizer, saved tiny random Llamas (one with a tied head, for
layer sharding), the reference data, a 2-rank launcher."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import ALIGN_SHORT_CSV, SHARED_DATA, make_tiny_llama, random_masks, run_ranks
from safeneurons.masks.io import save_masks
from safeneurons.models import loading as model_loading

if os.environ.get("PYTEST_XDIST_WORKER"):  # -n 2 on 2 cores: one thread per worker and per process it starts
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data with the original repository's files (read in place, never copied)."""
    if not ALIGN_SHORT_CSV.is_file():
        pytest.skip(f"reference data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def demo_tokenizer():
    from safeneurons.models.loading import load_tokenizer

    return load_tokenizer("demo")


@pytest.fixture(scope="session")
def demo_model():
    """The shipped demo model in fp32, eval mode. Do not modify it: copy it first (copy.deepcopy)."""
    from safeneurons.models.loading import load_model

    return load_model("demo")


@pytest.fixture
def tiny_llama_dir(tmp_path: Path, demo_tokenizer) -> Path:
    """A saved tiny random Llama (2 layers, hidden 32) with the demo tokenizer, loadable with --model DIR."""
    model = make_tiny_llama(demo_tokenizer)
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    demo_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tied_llama(tmp_path_factory):
    """A 5-layer Llama whose head is tied to its embeddings (as SmolLM2's), saved as safetensors."""
    from safeneurons.models.loading import load_tokenizer

    tokenizer = load_tokenizer("demo")
    model = make_tiny_llama(tokenizer, layers=5)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    folder = tmp_path_factory.mktemp("tied") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


@pytest.fixture
def torchrun():
    return run_ranks


@pytest.fixture(scope="module")
def tiny_with_masks(tmp_path_factory, demo_tokenizer) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("finetune")
    model = make_tiny_llama(demo_tokenizer, seed=11)
    model.save_pretrained(root / "model")
    demo_tokenizer.save_pretrained(root / "model")
    masks = random_masks(model)
    save_masks(masks, root / "masks")
    return root / "model", root / "masks" / "masks.safetensors", masks


@pytest.fixture
def no_model_load(monkeypatch):
    monkeypatch.setattr(model_loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))


@pytest.fixture
def workspace(tmp_path, demo_model):
    save_masks({"model.layers.0.mlp.up_proj.weight": demo_model.model.layers[0].mlp.up_proj.weight != 0},
               tmp_path / "masks")
    (tmp_path / "binary.txt").write_bytes(bytes(range(128, 256)) * 4)
    (tmp_path / "taken").write_text("keep me")
    return tmp_path
