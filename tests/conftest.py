"""Shared fixtures: the demo model, tiny random Llama models, the reference data, and a 2-rank launcher."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ALIGN_SHORT_CSV = SHARED_DATA / "SFT_aligned_llama2-7b-chat-hf_train_short.csv"
ADVBENCH_TXT = SHARED_DATA / "advbench.txt"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data with the original repository's files (read in place, never copied)."""
    if not ALIGN_SHORT_CSV.is_file():
        pytest.skip(f"reference data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def demo_tokenizer():
    from safeneurons.models import load_tokenizer

    return load_tokenizer("demo")


@pytest.fixture(scope="session")
def demo_model():
    """The shipped demo model in fp32, eval mode. Do not modify it: copy it first (copy.deepcopy)."""
    from safeneurons.models import load_model

    return load_model("demo")


def make_tiny_llama(tokenizer, seed: int = 0, layers: int = 2, hidden: int = 32, intermediate: int = 64,
                    heads: int = 4, kv_heads: int | None = None):
    """A random Llama with the demo tokenizer's vocabulary, small enough for per-sample reference loops."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads or heads, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_llama_dir(tmp_path: Path, demo_tokenizer) -> Path:
    """A saved tiny random Llama (2 layers, hidden 32) with the demo tokenizer, loadable with --model DIR."""
    model = make_tiny_llama(demo_tokenizer)
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    demo_tokenizer.save_pretrained(path)
    return path


def run_ranks(args: Sequence[str], nproc: int = 2, timeout: float = 300, env: dict | None = None,
              launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """Run `python -m <args>` (for example ["safeneurons.cli", "score", ...]) on `nproc` CPU ranks.

    One thread per rank keeps 2 ranks on 2 cores from thrashing. Output is captured; the caller asserts."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "SAFENEURONS_TIMEOUT": "120",
                "PYTHONFAULTHANDLER": "1",  # a rank that aborts prints where it was
                **(env or {})}
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", *args]
    elif launcher == "mpirun":
        command = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(nproc),
                   "-x", "OMP_NUM_THREADS", "-x", "HF_HUB_OFFLINE", "-x", "SAFENEURONS_TIMEOUT",
                   sys.executable, "-m", *args]
    else:
        raise ValueError(launcher)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)


@pytest.fixture
def torchrun():
    return run_ranks
