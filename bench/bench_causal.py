"""The causal stages' costs, measured side by side in one run:

1. `lowrank` per Linear: exact projections (eigh of AᵀA) against randomized SVD (`--niter 2`), same Grams;
2. `lowrank` end to end on 1 rank and on 2 ranks (torchrun, no DeepSpeed: layers dealt to the ranks);
3. `prune`: peak memory (RSS) of the streaming prune (safetensors shards) against loading the whole model.

    python bench/bench_causal.py [--layers 8 --hidden 512] [--nsamples 32]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def build_model(folder: Path, hidden: int, layers: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from safeneurons.models.loading import load_tokenizer

    tokenizer = load_tokenizer("demo")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, max_shard_size="20MB")  # several shards: the streaming prune holds one at a time
    tokenizer.save_pretrained(folder)
    return folder


def per_linear_svd(model_dir: Path, nsamples: int) -> None:
    from safeneurons.data.samples import load_samples
    from safeneurons.interventions.lowrank import collect_grams, top_output_directions
    from safeneurons.models.loading import load_model, load_tokenizer
    from safeneurons.scores.config import targets_of

    torch.set_num_threads(1)
    model, tokenizer = load_model(str(model_dir)), load_tokenizer(str(model_dir))
    targets = targets_of(model)
    samples = load_samples("demo-align", tokenizer, nsamples, 0, 128)
    grams = collect_grams(model, targets, samples, 8, {t.name: t.shape[1] for t in targets})
    rank = 16
    timings = {"exact": 0.0, "randomized (niter 2)": 0.0}
    for target in targets:
        weight = target.weight.detach()
        for label, niter in (("exact", None), ("randomized (niter 2)", 2)):
            started = time.perf_counter()
            top_output_directions(weight, grams[target.name], rank, niter)
            timings[label] += time.perf_counter() - started
    print(f"\nlowrank projections, {len(targets)} Linears, rank {rank}: exact {timings['exact']:.2f} s, randomized "
          f"{timings['randomized (niter 2)']:.2f} s, exact / randomized "
          f"{timings['exact'] / timings['randomized (niter 2)']:.2f}x")


def lowrank_command(model_dir: Path, out: Path, nsamples: int, ranks: int) -> tuple[float, float]:
    """(wall seconds, seconds inside the stage: passes, projections, write-back) of one `lowrank` run."""
    args = ["-m", "safeneurons.cli", "lowrank", "--model", str(model_dir), "--data", "demo-align", "--utility-data",
            "demo-utility", "--rank-safety", "16", "--rank-utility", "64", "--nsamples", str(nsamples),
            "--batch-size", "8", "--max-length", "128", "--out", str(out)]
    if ranks > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}  # one thread per rank, LAPACK included
    started = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, capture_output=True, env=env)
    wall = time.perf_counter() - started
    return wall, json.loads((out / "lowrank_summary.json").read_text())["seconds"]


def peak_rss_mib(setup: str, code: str) -> float:
    """Peak RSS (MiB) of a fresh Python process while it runs `code`, after `setup` (imports) and a reset of the
    peak (Linux: /proc/self/clear_refs), so that import-time peaks do not hide the work's."""
    probe = (f"{setup}\nopen('/proc/self/clear_refs', 'w').write('5')\n{code}\n"
             f"print([line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')][0])")
    result = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return int(result.stdout.strip().splitlines()[-1]) / 1024  # kB


def prune_memory(model_dir: Path, work: Path) -> None:
    from safeneurons.masks.io import save_masks
    from safeneurons.models.loading import load_model

    model = load_model(str(model_dir))
    generator = torch.Generator().manual_seed(0)
    save_masks({name: torch.rand(param.shape, generator=generator) < 0.03 for name, param in model.named_parameters()
                if "proj" in name}, work / "masks")
    size = sum(path.stat().st_size for path in model_dir.glob("*.safetensors")) / 2 ** 20
    setup = ("from pathlib import Path; from safeneurons.prune import prune_files, prune_model; "
             "from safeneurons.models import load_model_and_tokenizer, save_hf_folder")
    idle = peak_rss_mib(setup, "pass")
    streaming = peak_rss_mib(setup, f"Path('{work}/s').mkdir(); prune_files('{model_dir}', '{work}/masks', "
                                    f"Path('{work}/s'))")
    whole = peak_rss_mib(setup, f"m, t = load_model_and_tokenizer('{model_dir}'); prune_model(m, '{work}/masks'); "
                                f"save_hf_folder(m, t, '{work}/w')")
    print(f"prune, {size:.0f} MiB of weights in {len(list(model_dir.glob('*.safetensors')))} shards: peak RSS above "
          f"the imports ({idle:.0f} MiB): streaming {streaming - idle:.0f} MiB, whole model {whole - idle:.0f} MiB "
          f"({(whole - idle) / max(streaming - idle, 1):.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--nsamples", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_model(work / "model", args.hidden, args.layers)
        params = sum(p.numel() for p in __import__("safeneurons.models", fromlist=["x"]).load_model(
            str(model_dir)).parameters())
        print(f"model: {args.layers} layers, hidden {args.hidden}, {params / 1e6:.1f}M parameters")
        per_linear_svd(model_dir, args.nsamples)
        (one, one_loop), (two, two_loop) = (lowrank_command(model_dir, work / f"lr{n}", args.nsamples, n)
                                            for n in (1, 2))
        print(f"lowrank, 1 rank vs 2 ranks: stage {one_loop:.1f} s vs {two_loop:.1f} s ({one_loop / two_loop:.2f}x); "
              f"wall with start-up {one:.1f} s vs {two:.1f} s ({one / two:.2f}x)")
        prune_memory(model_dir, work)


if __name__ == "__main__":
    main()
