"""Helpers the tests share: paths of the repository and the reference data, tiny random models, a launcher
of N ranks."""
from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ALIGN_SHORT_CSV = SHARED_DATA / "SFT_aligned_llama2-7b-chat-hf_train_short.csv"
ADVBENCH_TXT = SHARED_DATA / "advbench.txt"


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


# ------------------------------------------------ independent references and checks that several test files share

LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


TINY_SAMPLES = dict(data="demo-align", nsamples=6, seed=0, max_length=48)


RATIO = 0.3  # 32 columns × 0.3 = 9.6: int() must give 9 per row


def layer_linears(model, layer: int) -> dict[str, torch.nn.Linear]:
    block = model.model.layers[layer]
    return {f"model.layers.{layer}.{name}.weight": block.get_submodule(name) for name in LINEAR_NAMES}


def reference_statistics(model, samples, linears: dict, method: str,
                         in_model_dtype: bool = False) -> dict[str, torch.Tensor]:
    """wanda: the original repository's running average of ||x_j||² over response tokens; wandg: Σ |param.grad|
    in fp32, or with `in_model_dtype` in the gradient's own dtype (the original's `zeros_like(weight)` buffers)."""
    stats: dict[str, torch.Tensor] = {}
    if method == "wanda":
        seen = 0
        running = {name: torch.zeros(module.in_features) for name, module in linears.items()}
        for sample in samples:
            inputs = {}
            handles = [module.register_forward_hook(lambda m, a, o, name=name: inputs.__setitem__(name, a[0]))
                       for name, module in linears.items()]
            with torch.no_grad():
                model(sample.input_ids[None])
            for handle in handles:
                handle.remove()
            seen += 1
            for name in linears:
                rows = inputs[name][0][sample.labels != -100].float()
                running[name] = running[name] * (seen - 1) / seen + torch.norm(rows, p=2, dim=0) ** 2 / seen
        return running
    for param in model.parameters():
        param.requires_grad_(False)
    for module in linears.values():
        module.weight.requires_grad_(True)
    for sample in samples:
        model.zero_grad(set_to_none=True)
        model(sample.input_ids[None], labels=sample.labels[None]).loss.backward()
        for name, module in linears.items():
            grad = module.weight.grad.abs() if in_model_dtype else module.weight.grad.float().abs()
            stats[name] = stats.get(name, 0) + grad
    return stats


def reference_masks(model, samples, method: str, ratio: float, sequential: bool):
    """Per layer: score (on a model whose earlier layers are pruned when `sequential`), take the top per row."""
    model = copy.deepcopy(model)
    layers = range(len(model.model.layers))
    all_linears = {name: module for layer in layers for name, module in layer_linears(model, layer).items()}
    unpruned = None if sequential else reference_statistics(model, samples, all_linears, method)
    masks, scores = {}, {}
    for layer in layers:
        linears = layer_linears(model, layer)
        stats = reference_statistics(model, samples, linears, method) if sequential else unpruned
        for name, module in linears.items():
            weight = module.weight.detach().abs()
            score = weight * (stats[name].sqrt()[None, :] if method == "wanda" else stats[name])
            keep = int(score.shape[1] * ratio)
            order = torch.argsort(score, dim=1, descending=True)[:, :keep]
            mask = torch.zeros_like(score, dtype=torch.bool)
            for row in range(score.shape[0]):
                mask[row, order[row]] = True
            masks[name], scores[name] = mask, score
        if sequential:
            with torch.no_grad():
                for name, module in linears.items():
                    module.weight[masks[name]] = 0
    return masks, scores


HEADS = 4


# Tiny models of the other architectures safety papers report on (Gemma-2/3 with post-norms, Qwen3, Phi-3 fused)
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=HEADS,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
ARCHS = {"gemma2": dict(head_dim=32), "gemma3_text": dict(head_dim=32, sliding_window=16),
         "qwen3": dict(head_dim=32), "phi3": dict()}


def tiny_model(arch: str, tokenizer, seed: int = 0):
    """A random tiny model of `arch` with the demo tokenizer's vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  **COMMON, **ARCHS[arch])
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()



# Tiny mixtures of experts of the families safety work studies in 2026, each with what sets it apart: Qwen2-MoE's
# shared expert and its gate, Qwen3-MoE's dense first layer (mlp_only_layers), GPT-OSS's transposed, interleaved
# experts with biases and its router's bias.
MOE_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=2,
                  max_position_embeddings=256, tie_word_embeddings=False, num_experts_per_tok=2)
MOE_FAMILIES = {
    "mixtral": dict(intermediate_size=24, num_local_experts=4),
    "qwen2_moe": dict(moe_intermediate_size=24, intermediate_size=40, shared_expert_intermediate_size=40,
                      num_experts=4, norm_topk_prob=False),
    "qwen3_moe": dict(moe_intermediate_size=24, intermediate_size=40, num_experts=4, head_dim=8, mlp_only_layers=[0]),
    "olmoe": dict(intermediate_size=24, num_experts=4),
    "gpt_oss": dict(intermediate_size=24, num_local_experts=4, head_dim=8,
                    layer_types=["sliding_attention", "full_attention"], sliding_window=16),
}


def tiny_moe(family: str, tokenizer, seed: int = 0, eager: bool = True):
    """A random tiny MoE model of `family` over the demo tokenizer's vocabulary; with `eager` its experts run
    transformers' eager loop (the reference our routed forward must equal bit for bit). Every weight is drawn from
    N(0, 0.2) so that routers, biases and experts all differ from their zero or small initialisations."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  **MOE_COMMON, **MOE_FAMILIES[family])
    if eager:
        config._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0, 0.2)
    return model


def _module(model, layer, component):
    block = model.model.layers[layer]
    return {"residual": block, "attn_out": block.self_attn, "mlp_out": block.mlp,
            "attn_head": block.self_attn.o_proj, "mlp_neuron": block.mlp.down_proj}[component]


def _hook(model, layer, component, edit):
    """Apply `edit` to the activation: module output (first element of a tuple), or o_proj's input for heads and
    down_proj's for neurons."""
    module = _module(model, layer, component)
    if component in ("attn_head", "mlp_neuron"):
        return module.register_forward_pre_hook(lambda m, args: (edit(args[0]),) + tuple(args[1:]))

    def on_output(m, args, output):
        if isinstance(output, tuple):
            return (edit(output[0]),) + tuple(output[1:])
        return edit(output)
    return module.register_forward_hook(on_output)


@functools.lru_cache(maxsize=None)  # model and tensors hash by identity: one capture per run and site
def ref_activation(model, ids, layer, component):
    store = {}

    def keep(x):
        store["x"] = x.detach().clone()
        return x
    handle = _hook(model, layer, component, keep)
    with torch.no_grad():
        model(ids)
    handle.remove()
    return store["x"][0]


def ref_positions(position, length):
    if position == "last":
        return [length - 1]
    if position == "all":
        return list(range(length))
    return [position % length]


def ref_patched_logits(model, base_ids, source_ids, site):
    """Run `base_ids` with one site replaced by the source run's activation (no batching, one site)."""
    source = ref_activation(model, source_ids, site.layer, site.component)
    base_pos = ref_positions(site.position, base_ids.shape[1])
    source_pos = ref_positions(site.position, source_ids.shape[1])
    width = source.shape[-1]
    cols = list(range(width)) if site.head is None else list(range(site.head * width // HEADS,
                                                                  (site.head + 1) * width // HEADS))
    cols = cols if site.neurons is None else list(site.neurons)

    def replace(x):
        x = x.clone()
        for b, s in zip(base_pos, source_pos):
            x[0, b, cols] = source[s, cols]
        return x
    handle = _hook(model, site.layer, site.component, replace)
    with torch.no_grad():
        logits = model(base_ids).logits[:, -1]
    handle.remove()
    return logits


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits[:, -1]


def token_metric(logits):  # a user metric_fn: last-position logits [1, vocab] -> float
    return float(logits[0, :350].sum() - logits[0, 350:700].sum())


def random_masks(model: torch.nn.Module, seed: int = 5) -> dict[str, torch.Tensor]:
    """About 30% of every projection and of the final norm (a ZeRO-3 'persistent' parameter) frozen."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(param.shape, generator=generator) < 0.3
            for name, param in model.named_parameters() if "proj" in name or name == "model.norm.weight"}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def report(folder: Path) -> dict:
    return json.loads((folder / "freeze_report.json").read_text())


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files in `folder`, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tensorboard_text(folder: Path, tag: str = "config/text_summary") -> str:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return events.Tensors(tag)[0].tensor_proto.string_val[0].decode()


def assert_tracked_like_the_report(folder: Path, summary: dict, events: str = "runs") -> None:
    """One event file in folder/events (rank 0 alone writes), the loss of every step equal to the report's, the
    gradient norms, the config."""
    folder = folder / events
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1
    scalars = tensorboard_scalars(folder)
    steps = list(range(1, summary["steps"] + 1))
    assert scalars["train/loss"] == [(step, torch.tensor(loss).float().item())  # event files hold float32
                                     for step, loss in zip(steps, summary["loss_curve"])]
    assert [step for step, _ in scalars["train/grad_norm"]] == steps
    assert all(norm > 0 for _, norm in scalars["train/grad_norm"])
    assert "report_to: tensorboard" in tensorboard_text(folder)


def assert_frozen_identical_free_changed(original: dict, trained: dict, masks: dict) -> None:
    for name, mask in masks.items():
        before, after = original[name].to(trained[name].dtype), trained[name]
        assert torch.equal(after[mask].view(torch.int16 if after.dtype == torch.bfloat16 else torch.int32),
                           before[mask].view(torch.int16 if after.dtype == torch.bfloat16 else torch.int32)), name
        assert not torch.equal(after[~mask], before[~mask]), name


def run_expecting_error(command: list[str], workspace, capsys) -> str:
    """Run a command that must fail with one line on stderr and exit 2; returns that line."""
    from safeneurons import cli

    argv = [part.replace("{masks}", str(workspace / "masks")).replace("{root}", str(workspace)) for part in command]
    capsys.readouterr()
    assert cli.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    return error


def permute_mlp_neurons(model: torch.nn.Module, seed: int) -> list[torch.Tensor]:
    """Permute every layer's MLP neurons in place (gate/up rows and down columns alike): the function is unchanged.
    Returns the permutations: new neuron k is old neuron perm[k]."""
    from safeneurons.models.structure import decoder_layers

    generator = torch.Generator().manual_seed(seed)
    perms = []
    with torch.no_grad():
        for block in decoder_layers(model):
            mlp = block.mlp
            perm = torch.randperm(mlp.gate_proj.out_features, generator=generator)
            mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[perm])
            mlp.up_proj.weight.copy_(mlp.up_proj.weight[perm])
            mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, perm])
            perms.append(perm)
    return perms


PEAK_OF = """
import ctypes
from pathlib import Path

def status(field):  # bytes of a kB field in /proc/self/status
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) * 1024

def peak_of(run):
    # the peak resident memory of run() above what the process holds just before it: the heap the warm-up freed
    # handed back to the system first, then the peak (VmHWM) restarted from the current size through clear_refs
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = status("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")
    run()
    return status("VmHWM:") - before
"""
# glibc's mmap threshold fixed: large freed blocks leave RSS at once instead of staying in its heap
PEAK_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def measure_peak(script: str, *args: object, timeout: float = 300) -> list[int]:
    """`script` after PEAK_OF in a fresh Python with `args`: the integers it prints after PEAK."""
    result = subprocess.run([sys.executable, "-c", PEAK_OF + script, *map(str, args)], capture_output=True,
                            text=True, timeout=timeout, env={**os.environ, **PEAK_ENV})
    assert result.returncode == 0, result.stderr[-2000:]
    return [int(value) for value in result.stdout.split("PEAK ", 1)[1].split()]
