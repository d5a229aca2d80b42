"""Masked vs unmasked ZeRO-3 fine-tuning, side by side in one run: step time and memory per rank.

    python bench/bench_finetune.py                 # 2 CPU ranks (launches itself under torchrun)
    python bench/bench_finetune.py --steps 8 --models demo --memory-model ''

For each model, two DeepSpeed ZeRO-3 engines (AdamW, weight decay 0.1, clipping 1.0) are built from the same
weights, one with ~3% of every projection frozen (a random mask read from a mask file), and their steps
alternate on the same batches, so machine load hits both alike. Reported per model: the median step time of
each and their ratio (target <= 1.05), and the median time spent inside the freezing mechanism itself (the
figure that machine load does not blur); per rank the packed mask bytes against 1/world_size of a bit mask
of the whole model (target <= 1), the saved frozen values, the largest transient unpacked mask, and the
frozen drift (0). Then the peak RSS per rank of two processes training one engine each (plain, masked) on
the `--memory-model`.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DENSITY = 0.03
MODELS = {
    "demo": None,
    # 8 layers, hidden 512, vocab 32000: about 58M parameters
    "llama58m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                     num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                     tie_word_embeddings=False),
}


@dataclass
class Result:
    model: str
    parameters: int
    plain_ms: float
    masked_ms: float
    mask_work_ms: float  # of the masked step, time inside the freezing mechanism (zero grads + restore)
    mask_bytes: int
    value_bytes: int
    bit_mask_share: float  # bytes of a bit mask of the whole model / world size
    transient_bytes: int
    drift: float


def build_model(name: str, ds_config: dict, seed: int) -> torch.nn.Module:
    from safeneurons.models.loading import load_model
    from safeneurons.runtime.zero3 import zero3_init_context

    torch.manual_seed(seed)
    if MODELS[name] is None:
        return load_model(name, ds_config=ds_config).train()
    from transformers import AutoModelForCausalLM, LlamaConfig

    with zero3_init_context(ds_config):  # from_config builds the model partitioned (zero.Init) under ZeRO-3
        return AutoModelForCausalLM.from_config(LlamaConfig(**MODELS[name])).train()


def write_random_masks(models: list[str], directory: Path, seed: int) -> None:
    """Mask files (3% of every projection, random) written once by the launching process; ranks read their rows."""
    from safeneurons.masks.io import save_masks

    for name in models:
        model = build_model(name, {}, seed)
        generator = torch.Generator().manual_seed(seed)
        save_masks({param_name: torch.rand(param.shape, generator=generator) < DENSITY
                    for param_name, param in model.named_parameters() if param_name.endswith("proj.weight")},
                   directory / name)


def ds_config_for(name: str, batch_size: int, world: int) -> dict:
    from transformers import AutoConfig

    from safeneurons.runtime.dsconfig import fill_config

    hidden = MODELS[name]["hidden_size"] if MODELS[name] else AutoConfig.from_pretrained(
        str(REPO / "src" / "safeneurons" / "demo_assets" / "chat")).hidden_size
    return fill_config(REPO / "ds_configs" / "zero3.json", micro_batch_size=batch_size, world_size=world,
                       learning_rate=1e-4, weight_decay=0.1, gradient_clipping=1.0, dtype=torch.float32,
                       hidden_size=hidden)


def engine_for(model: torch.nn.Module, ds_config: dict):
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=ds_config, model_parameters=list(model.parameters()))
    return engine


def time_mask_work(frozen, spent: list[float]) -> None:
    """Record the seconds the masked engine spends in the freezing mechanism itself (both halves)."""
    for method in ("zero_frozen_grads", "restore"):
        original = getattr(frozen, method)

        def timed(original=original) -> None:
            started = time.perf_counter()
            original()
            spent.append(time.perf_counter() - started)

        setattr(frozen, method, timed)


def timed_step(engine, batch: torch.Tensor) -> float:
    started = time.perf_counter()
    loss = engine(input_ids=batch, labels=batch).loss
    engine.backward(loss)
    engine.step()
    return time.perf_counter() - started


def bench_model(name: str, mask_dir: Path, steps: int, batch_size: int, length: int, seed: int) -> Result:
    from safeneurons.interventions.freezing import freeze
    from safeneurons.runtime import distributed
    from safeneurons.runtime.distributed import reduce_over_ranks

    world = distributed.world_size()
    ds_config = ds_config_for(name, batch_size, world)
    plain_model, masked_model = build_model(name, ds_config, seed), build_model(name, ds_config, seed)
    frozen = freeze(masked_model, mask_dir / name)
    parameters = sum(int(getattr(param, "ds_numel", param.numel())) for param in plain_model.parameters())
    plain, masked = engine_for(plain_model, ds_config), engine_for(masked_model, ds_config)
    frozen.attach(masked)
    mask_work: list[float] = []
    time_mask_work(frozen, mask_work)
    vocab = plain_model.config.vocab_size
    generator = torch.Generator().manual_seed(seed + distributed.rank())
    times: dict[str, list[float]] = {"plain": [], "masked": [], "mask work": []}
    for step in range(steps + 1):  # step 0 warms up both
        batch = torch.randint(0, vocab, (batch_size, length), generator=generator)
        order = [("plain", plain), ("masked", masked)]
        for label, engine in order if step % 2 else reversed(order):
            before = sum(mask_work)
            elapsed = timed_step(engine, batch)
            if step:
                times[label].append(reduce_over_ranks(elapsed, "max"))
                if label == "masked":
                    times["mask work"].append(reduce_over_ranks(sum(mask_work) - before, "max"))
    transient = max((entry.length for entry in frozen.slices.values()), default=0)  # one unpacked bool mask
    return Result(name, parameters, 1000 * statistics.median(times["plain"]), 1000 * statistics.median(times["masked"]),
                  1000 * statistics.median(times["mask work"]),
                  int(reduce_over_ranks(frozen.mask_bytes, "max")), int(reduce_over_ranks(frozen.value_bytes, "max")),
                  parameters / 8 / world, int(reduce_over_ranks(transient, "max")), frozen.max_drift())


def peak_memory(name: str, mask_dir: Path | None, steps: int, batch_size: int, length: int, seed: int) -> float:
    """Largest peak RSS over the ranks (MiB) of a process that trains one engine, masked when `mask_dir` is set."""
    from safeneurons.interventions.freezing import freeze
    from safeneurons.runtime.distributed import reduce_over_ranks

    ds_config = ds_config_for(name, batch_size, int(os.environ["WORLD_SIZE"]))
    model = build_model(name, ds_config, seed)
    frozen = freeze(model, mask_dir / name) if mask_dir else None
    engine = engine_for(model, ds_config)
    if frozen is not None:
        frozen.attach(engine)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        timed_step(engine, torch.randint(0, model.config.vocab_size, (batch_size, length), generator=generator))
    return reduce_over_ranks(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "max")


def print_table(results: list[Result], world: int) -> None:
    print(f"\nZeRO-3, {world} ranks, AdamW wd 0.1, clipping 1.0, {DENSITY:.0%} of every projection frozen; "
          f"per-rank bytes are the largest over ranks")
    header = (f"{'model':>9} {'params':>8} {'plain ms':>9} {'masked ms':>9} {'time ratio':>10} {'mask work ms':>12} "
              f"{'work/plain':>10} {'mask B/rank':>11} "
              f"{'bitmask/W B':>11} {'mem ratio':>9} {'values B/rank':>13} {'transient B':>11} {'drift':>5}")
    print(header)
    for result in results:
        print(f"{result.model:>9} {result.parameters / 1e6:>7.1f}M {result.plain_ms:>9.1f} {result.masked_ms:>9.1f} "
              f"{result.masked_ms / result.plain_ms:>10.3f} {result.mask_work_ms:>12.1f} "
              f"{result.mask_work_ms / result.plain_ms:>10.4f} {result.mask_bytes:>11} {result.bit_mask_share:>11.0f} "
              f"{result.mask_bytes / result.bit_mask_share:>9.3f} {result.value_bytes:>13} "
              f"{result.transient_bytes:>11} {result.drift:>5g}")


def launch(args: argparse.Namespace, *extra: str, script: str = __file__) -> str:
    """Run `script` (this one by default) with this command's arguments on `--nproc` ranks under torchrun; its
    stdout."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               script, *sys.argv[1:], *extra]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, text=True)
    if result.returncode:
        raise SystemExit(f"benchmark ranks failed (exit {result.returncode})")
    return result.stdout


def run_ranks(args: argparse.Namespace) -> None:
    from safeneurons.runtime import distributed

    distributed.init_distributed(require_process_group=True)
    if args.memory is not None:
        peak = peak_memory(args.memory_model, args.mask_dir if args.memory == "masked" else None, args.memory_steps,
                           args.batch_size, args.length, args.seed)
        if distributed.is_main():
            print(f"PEAK_RSS_MIB {peak:.1f}")
    else:
        results = [bench_model(name, args.mask_dir, args.steps, args.batch_size, args.length, args.seed)
                   for name in args.models.split(",")]
        if distributed.is_main():
            print_table(results, distributed.world_size())
    distributed.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,llama58m", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per engine (after one warm-up step)")
    parser.add_argument("--memory-model", default="llama58m", help="model of the peak-memory comparison ('' = none)")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps of each peak-memory process")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--nproc", type=int, default=2, help="ranks when launching itself")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mask-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--memory", choices=("plain", "masked"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if "RANK" in os.environ:
        run_ranks(args)
        return 0
    names = sorted(set(args.models.split(",")) | ({args.memory_model} - {""}))
    with tempfile.TemporaryDirectory() as scratch:
        write_random_masks(names, Path(scratch), args.seed)
        print(launch(args, "--mask-dir", scratch).strip())
        if args.memory_model:
            peaks = {variant: float(launch(args, "--mask-dir", scratch, "--memory", variant).split()[-1])
                     for variant in ("plain", "masked")}
            print(f"\npeak RSS per rank, {args.memory_model}, one engine per process, {args.memory_steps} steps: "
                  f"plain {peaks['plain']:.0f} MiB, masked {peaks['masked']:.0f} MiB, "
                  f"ratio {peaks['masked'] / peaks['plain']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
