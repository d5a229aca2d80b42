"""What each fine-tuning mechanism costs against plain training, side by side in one run (ZeRO-3, 2 CPU ranks).

    python bench/bench_finetune_extensions.py                   # launches itself under torchrun
    python bench/bench_finetune_extensions.py --models demo --steps 4

For each model and mechanism, a plain ZeRO-3 engine and the mechanism's engine are built from the same weights
and their steps alternate on the same batches (as bench_finetune.py does), so machine load hits both alike.
Mechanisms: the exact freeze (s = 1, 3% of every projection), the partial freeze (s = 0.5), activation
checkpointing, the safety loss (a second forward per micro-batch), plain LoRA (r 8 on q/v) and protected LoRA
(same, masked); protected LoRA is also compared with plain LoRA directly. Dynamic freezing: the time of one
re-scoring (wandg, 8 samples of 64 tokens) as a fraction of a plain step, per K. Activation checkpointing's
memory: the bytes autograd saves for the backward in one single-process step, with and without.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_finetune import MODELS, build_model, ds_config_for, launch, write_random_masks  # noqa: E402

MECHANISMS = ("masked", "partial", "checkpointing", "safety loss", "lora", "lora protected")
LORA = dict(r=8, alpha=16.0, targets=("q_proj", "v_proj"))


def engine_of(model: torch.nn.Module, ds_config: dict):
    import deepspeed

    parameters = [param for param in model.parameters() if param.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, model_parameters=parameters)
    return engine


def build(mechanism: str, name: str, ds_config: dict, mask_dir: Path, seed: int):
    """The engine of one mechanism (or "plain"), built from the seeded weights."""
    from safeneurons.finetune.lora import add_adapters
    from safeneurons.interventions.freezing import freeze

    model = build_model(name, ds_config, seed)
    if mechanism == "checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mechanism.startswith("lora"):
        model = add_adapters(model, LORA["r"], LORA["alpha"], LORA["targets"],
                             mask_dir / name if mechanism == "lora protected" else None)
    frozen = freeze(model, mask_dir / name, 0.5 if mechanism == "partial" else 1.0) \
        if mechanism in ("masked", "partial") else None
    engine = engine_of(model, ds_config)
    if frozen is not None:
        frozen.attach(engine)
    return engine


def step(engine, batch: torch.Tensor, safety: torch.Tensor | None) -> float:
    started = time.perf_counter()
    loss = engine(input_ids=batch, labels=batch).loss
    if safety is not None:
        loss = loss + engine(input_ids=safety, labels=safety).loss
    engine.backward(loss)
    engine.step()
    return time.perf_counter() - started


def side_by_side(name: str, baseline: str, mechanism: str, mask_dir: Path, steps: int, batch_size: int, length: int,
                 seed: int) -> tuple[float, float]:
    """Median step seconds (largest over ranks) of the baseline and the mechanism, alternating."""
    from safeneurons.runtime import distributed
    from safeneurons.runtime.distributed import reduce_over_ranks

    ds_config = ds_config_for(name, batch_size, distributed.world_size())
    engines = {label: build(label, name, ds_config, mask_dir, seed) for label in (baseline, mechanism)}
    vocab = engines[baseline].module.config.vocab_size
    generator = torch.Generator().manual_seed(seed + distributed.rank())
    times: dict[str, list[float]] = {baseline: [], mechanism: []}
    for index in range(steps + 1):  # step 0 warms up both
        batch = torch.randint(0, vocab, (batch_size, length), generator=generator)
        safety = torch.randint(0, vocab, (batch_size, length), generator=generator)
        order = list(engines.items())
        for label, engine in order if index % 2 else reversed(order):
            elapsed = step(engine, batch, safety if label == "safety loss" else None)
            if index:
                times[label].append(reduce_over_ranks(elapsed, "max"))
    return statistics.median(times[baseline]), statistics.median(times[mechanism])


def rescore_seconds(name: str, mask_dir: Path, batch_size: int, length: int, seed: int) -> float:
    """One dynamic-freezing update on a ZeRO-3 engine (largest over ranks)."""
    from safeneurons.interventions.dynamic import DynamicFreezing
    from safeneurons.interventions.freezing import freeze
    from safeneurons.models.loading import load_tokenizer
    from safeneurons.runtime import distributed
    from safeneurons.runtime.distributed import reduce_over_ranks
    from safeneurons.scores.config import ScoreConfig

    ds_config = ds_config_for(name, batch_size, distributed.world_size())
    model = build_model(name, ds_config, seed)
    frozen = freeze(model, mask_dir / name)
    engine = engine_of(model, ds_config)
    config = ScoreConfig(method="wandg", data="demo-align", sparsity_ratio=0.03, nsamples=8, max_length=length)
    dynamic = DynamicFreezing(frozen, engine.module, load_tokenizer("demo"), config, 1, "union", torch.device("cpu"))
    dynamic.attach(engine)
    dynamic.rescore(0)  # warm-up
    started = time.perf_counter()
    dynamic.rescore(1)
    return reduce_over_ranks(time.perf_counter() - started, "max")


def saved_activation_bytes(name: str, checkpointing: bool, batch_size: int, length: int, seed: int) -> int:
    """Bytes of the tensors autograd keeps for the backward of one step (unique storages, parameters excluded)."""
    model = build_model(name, {}, seed).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    parameters = {param.data_ptr() for param in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    batch = torch.randint(0, model.config.vocab_size, (batch_size, length),
                          generator=torch.Generator().manual_seed(seed))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    return sum(storages.values())


def run_ranks(args: argparse.Namespace) -> None:
    from safeneurons.runtime import distributed

    distributed.init_distributed(require_process_group=True)
    rows = []
    for name in args.models.split(","):
        for mechanism in MECHANISMS:
            plain, other = side_by_side(name, "plain", mechanism, args.mask_dir, args.steps, args.batch_size,
                                        args.length, args.seed)
            rows.append((name, f"{mechanism} vs plain", plain, other))
        lora, protected = side_by_side(name, "lora", "lora protected", args.mask_dir, args.steps, args.batch_size,
                                       args.length, args.seed)
        rows.append((name, "lora protected vs lora", lora, protected))
        rescore = rescore_seconds(name, args.mask_dir, args.batch_size, args.length, args.seed)
        plain_step = next(row[2] for row in rows if row[0] == name)
        rows.append((name, "one re-scoring vs plain step", plain_step, rescore))
    if distributed.is_main():
        print(f"ZeRO-3, {distributed.world_size()} ranks, fp32, batch {args.batch_size} × {args.length} tokens, "
              f"median of {args.steps} alternating steps (ms, largest over ranks)")
        print(f"{'model':>9} {'comparison':>32} {'baseline ms':>11} {'mechanism ms':>12} {'ratio':>7}")
        for name, label, baseline, other in rows:
            print(f"{name:>9} {label:>32} {1000 * baseline:>11.1f} {1000 * other:>12.1f} {other / baseline:>7.3f}")
        for name in args.models.split(","):
            rescore = next(row[3] for row in rows if row[0] == name and row[1].startswith("one re-scoring"))
            plain_step = next(row[2] for row in rows if row[0] == name)
            costs = ", ".join(f"K={k}: {rescore / (k * plain_step):.1%}" for k in (10, 50, 100))
            print(f"{name}: dynamic freezing adds one re-scoring per K steps = {costs} of plain training time")
    distributed.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,llama58m", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per engine (after one warm-up step)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--nproc", type=int, default=2, help="ranks when launching itself")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mask-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if "RANK" in os.environ:
        run_ranks(args)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        write_random_masks(args.models.split(","), Path(scratch), args.seed)
        print(launch(args, "--mask-dir", scratch, script=__file__).strip())
    for name in args.models.split(","):
        plain, checkpointed = (saved_activation_bytes(name, flag, args.batch_size, args.length, args.seed)
                               for flag in (False, True))
        print(f"{name}: saved for backward per step {plain / 2**20:.1f} MiB without, {checkpointed / 2**20:.1f} MiB "
              f"with activation checkpointing ({checkpointed / plain:.2f}×)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
