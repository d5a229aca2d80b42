"""Model loading: local folders, aliases, offline errors, architecture checks, the demo model's behaviour."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch

from helpers import REPO
from safeneurons import demo, models
from safeneurons.data.samples import load_prompts
from safeneurons.errors import SafeneuronsError
from safeneurons.evaluation.generation import Decoding, generate
from safeneurons.evaluation.metrics import is_refusal


@pytest.mark.parametrize("name", ["demo-chat", "demo-base"])
def test_demo_chat_refuses_harmful_and_base_complies(name, demo_tokenizer):
    """Held-out prompts (100 of each kind): demo-chat refuses >= 90% of the harmful ones and answers >= 90% of the
    benign ones; demo-base, the unaligned model it was aligned from, answers >= 90% of both. Both load with
    transformers' own from_pretrained and share the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = models.resolve_model_name(name)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.get_vocab() == demo_tokenizer.get_vocab()
    harmful = [texts[0] for texts in generate(model, tokenizer, load_prompts("demo-harmful", tokenizer),
                                              Decoding(24), 50)]
    harmless = [texts[0] for texts in generate(model, tokenizer, load_prompts("demo-harmless", tokenizer),
                                               Decoding(24), 50)]
    refusal_rate = sum(map(is_refusal, harmful)) / len(harmful)
    answer_rate = 1 - sum(map(is_refusal, harmless)) / len(harmless)
    if name == "demo-chat":
        assert refusal_rate >= 0.9, harmful[:5]
    else:
        assert refusal_rate <= 0.1, harmful[:5]
    assert answer_rate >= 0.9, harmless[:5]
    assert models.resolve_model_name("demo") == models.resolve_model_name("demo-chat")


def test_demo_model_shape(demo_model):
    config = demo_model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 6, 128)
    assert len(models.scored_linears(demo_model)) == 6 * 7


def test_scored_linears_names_match_parameters(demo_model):
    params = dict(demo_model.named_parameters())
    linears = models.scored_linears(demo_model, layer=2)
    assert [linear.param_name for linear in linears] == [
        f"model.layers.2.{name}.weight" for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                     "mlp.down_proj")]
    assert all(params[linear.param_name] is linear.weight for linear in linears)


def test_local_folder_and_dtype(tiny_llama_dir):
    model = models.load_model(str(tiny_llama_dir), dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(SafeneuronsError, match="dtype 'int3' is not one of"):
        models.load_model(str(tiny_llama_dir), dtype="int3")


def test_alias_offline_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SafeneuronsError) as caught:
        models.load_model("llama2-7b-chat-hf", cache_dir=str(tmp_path))
    message = str(caught.value)
    assert "'meta-llama/Llama-2-7b-chat-hf' (alias of 'llama2-7b-chat-hf') is not available locally" in message
    assert "--model DIR" in message and "\n" not in message


def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(SafeneuronsError, match="no decoder layers at model.layers; expected decoder layers at "
                                               r"model.layers with self_attn.\{q,k,v\}_proj \(or qkv_proj\)"):
        models.load_model(str(tmp_path))


def test_missing_linear_is_refused(demo_tokenizer):
    from helpers import make_tiny_llama

    model = make_tiny_llama(demo_tokenizer)
    model.model.layers[1].mlp.up_proj = torch.nn.Identity()
    with pytest.raises(SafeneuronsError, match="layer 1 does not have the structure safeneurons works on"):
        models.check_architecture(model)


def test_demo_model_cli_export_loads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = subprocess.run([sys.executable, "-m", "safeneurons.cli", "demo-model", "--out", str(tmp_path / "d")],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "d")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "d")
    reference = models.load_model("demo")
    ids = tokenizer("[INST] How do I rob a bank? [/INST]", return_tensors="pt")["input_ids"]
    assert torch.equal(model(ids).logits, reference(ids).logits)


def test_demo_build_is_deterministic(tmp_path):
    """Two short builds with the same settings give bit-identical weights (the full build uses the same code)."""
    build = demo.DemoBuild(steps=3, chat_steps=2, batch_size=4)
    first = demo.build_demo(tmp_path / "a", build)
    second = demo.build_demo(tmp_path / "b", build)
    for kind in ("chat", "base"):
        weights = [getattr(pair, kind) / "model.safetensors" for pair in (first, second)]
        assert weights[0].read_bytes() == weights[1].read_bytes(), kind
    assert (first.chat / "model.safetensors").read_bytes() != (first.base / "model.safetensors").read_bytes()
    assert (first.chat / "tokenizer.json").read_bytes() == (first.base / "tokenizer.json").read_bytes()
    different = demo.build_demo(tmp_path / "c", demo.DemoBuild(steps=3, chat_steps=2, batch_size=4, seed=5))
    assert (first.chat / "model.safetensors").read_bytes() != (different.chat / "model.safetensors").read_bytes()


def test_an_unreachable_hub_fails_at_once_in_one_line(monkeypatch, tmp_path):
    """Not offline by the environment, but the hub's endpoint refuses the connection: no online attempt (the hub
    client would retry for ~30 s), one line that says why."""
    from transformers import AutoConfig

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{port}")
    attempts = []
    original = AutoConfig.from_pretrained.__func__

    def recorded(cls, name, **kwargs):
        attempts.append(kwargs["local_files_only"])
        return original(cls, name, **kwargs)
    monkeypatch.setattr(AutoConfig, "from_pretrained", classmethod(recorded))
    with pytest.raises(SafeneuronsError) as caught:
        models.load_config("meta-llama/Llama-2-7b-chat-hf", cache_dir=str(tmp_path))
    message = str(caught.value)
    assert attempts == [True]
    assert f"the hub at http://127.0.0.1:{port} cannot be reached" in message and "\n" not in message


@pytest.mark.parametrize("name", ["smollm2-1.7b-instruct", "llama-2-7b"])
def test_a_name_that_is_no_folder_alias_or_hub_id_is_refused_before_any_download(name, no_model_load):
    with pytest.raises(SafeneuronsError, match=f"model '{name}' is not a local folder, a built-in name or alias "
                                               r"\(demo, demo-chat, demo-base, demo-judge, demo-moe, demo-moe-chat, demo-moe-base, llama2-7b-chat-hf.*"
                                               r"smollm2-135m-instruct, smollm2-safe\) nor an HF id"):
        models.load_config(name)
