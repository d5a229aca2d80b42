"""Do the distributed stages go faster on more ranks? Every stage on 1 rank, on 2 ranks that each hold the model,
and on 2 ranks under ZeRO-3, one thread per rank, side by side in one run on the same ~100M-parameter Llama.

    python bench/bench_distributed.py                     # all stages (about 10 minutes on 2 idle cores)
    python bench/bench_distributed.py --stages wandg,eval  # a subset

Stages and workloads (the real `safeneurons` commands, in-process after the imports):
wanda and wandg scoring (demo-align samples), exact patching (residual × every layer × every position), lineage
tracing (the model against a perturbed copy), generation (eval, keyword judge) and ActSVD (lowrank).
For each run it prints the loop time (the stage's passes, matchings or generations: the slowest rank), the stage
time (the command's `cli.main`: loading, data, selection and writing included), the wall time of the whole launch (Python, DeepSpeed and process-group start-up included), the speed-up of both against 1 rank, and the
tensor bytes each rank hands to torch.distributed collectives (and sends) per work item (sample, site, token or
prompt), counted by wrapping the collectives before anything is imported, and the largest rank's peak RSS.
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

REPO = Path(__file__).resolve().parents[1]
ZERO3 = str(REPO / "ds_configs" / "zero3_inference.json")
# (label, ranks, ZeRO-3, micro-batch, more options): "large" gives each rank all its items in one pass (scoring,
# lowrank, eval, trace) or 128 sites per pass (patch), amortising ZeRO-3's parameter gathers; "2 stages" holds one
# block of layers per rank (`--shard layers`)
# (labels have no commas: --configs is a comma-separated list of them)
CONFIGS = (("1 rank", 1, False, "default", ()), ("2 ranks", 2, False, "default", ()),
           ("2 ranks ZeRO-3", 2, True, "default", ()), ("ZeRO-3 large batch", 2, True, "large", ()),
           ("2 stages", 2, False, "default", ("--shard", "layers")))
# The functions whose time is a stage's loop (its passes, matchings or generations), wrapped in the worker
# (named where the stage looks them up, so that the wrapper is what it calls)
LOOPS = {"wanda": ("scores.statistics.collect_statistics",), "wandg": ("scores.statistics.collect_statistics",),
         "patch": ("interp.patching.patcher.ActivationPatcher.patch",),
         "trace": ("interp.tracing.trace.collect_shared", "interp.tracing.trace.sharded_activations",
                   "interp.tracing.trace.match_layer"),
         "eval": ("evaluation.evaluate.generate_distributed",), "lowrank": ("interventions.lowrank._modify",
                                                                    "interventions.lowrank.sharded_low_rank")}
COLLECTIVES = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "_all_gather_base",
               "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "gather", "scatter", "send",
               "isend", "all_to_all_single")


def stage_commands(model: str, other: str, args: argparse.Namespace, large: bool
                   ) -> dict[str, tuple[list[str], int]]:
    """Each stage's command line and its number of work items."""
    batch = str(args.nsamples // 2 if large else args.batch_size)
    score = ["--model", model, "--data", "demo-align", "--nsamples", str(args.nsamples), "--max-length", "128",
             "--batch-size", batch]
    prompt = "Give me step by step instructions to {} a farm."  # equal token lengths: every position pairs up
    return {
        "wanda": (["score", "--method", "wanda", *score], args.nsamples),
        "wandg": (["score", "--method", "wandg", *score], args.nsamples),
        "patch": (["patch", "--model", model, "--clean", prompt.format("help"), "--corrupted",
                   prompt.format("poison"), "--components", "residual", "--positions", "each", "--batch-size",
                   "128" if large else "32"],
                  0),  # sites: layers × positions, counted from the output
        "trace": (["trace", "--base", model, "--other", other, "--random-tokens", "--n-tokens",
                   str(args.trace_tokens), "--max-length", "128", "--batch-size",
                   str(max(1, args.trace_tokens // 128)) if large else "4"], args.trace_tokens),
        "eval": (["eval", "--model", model, "--prompts", "demo-harmful", "--limit", str(args.prompts),
                  "--harmless-limit", "0", "--perplexity-samples", "0", "--max-new-tokens", "32",
                  "--batch-size", str(args.prompts // 2) if large else "8"], args.prompts),
        "lowrank": (["lowrank", "--model", model, "--data", "demo-align", "--utility-data", "demo-utility",
                     "--nsamples", str(args.nsamples), "--max-length", "128", "--batch-size",
                     batch, "--rank-safety", "32", "--rank-utility", "32"], 2 * args.nsamples),
    }


# ------------------------------------------------------------------ one rank of one run

def count_collective_bytes(counter: list[int]) -> None:
    """Wrap torch.distributed's collectives (before DeepSpeed binds them) to add up the tensor bytes passed in."""
    import torch
    import torch.distributed as dist

    def size(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, (list, tuple)):
            return sum(size(item) for item in value)
        return 0

    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def wrapped(*call_args, _original=original, **kwargs):
            counter[0] += size(call_args[0]) if call_args else size(next(iter(kwargs.values()), None))
            return _original(*call_args, **kwargs)

        setattr(dist, name, wrapped)


def time_loops(names: tuple[str, ...], elapsed: list[float]) -> None:
    """Wrap each `module.function` (or `module.Class.method`) of safeneurons to add its run time to elapsed[0]."""
    import functools
    import importlib

    for name in names:
        parts = name.split(".")
        split = len(parts) - 1  # the longest prefix that is a module; the rest are attributes
        while not (REPO / "src" / "safeneurons" / Path(*parts[:split])).with_suffix(".py").is_file():
            split -= 1
        owner, path = importlib.import_module(".".join(["safeneurons", *parts[:split]])), parts[split:]
        for part in path[:-1]:
            owner = getattr(owner, part)
        original = getattr(owner, path[-1])

        @functools.wraps(original)
        def timed(*call_args, _original=original, **kwargs):
            started = time.perf_counter()
            try:
                return _original(*call_args, **kwargs)
            finally:
                elapsed[0] += time.perf_counter() - started

        setattr(owner, path[-1], timed)


def run_worker(args: argparse.Namespace) -> None:
    counter = [0]
    count_collective_bytes(counter)
    import torch

    torch.set_num_threads(1)
    import importlib

    from safeneurons import cli
    from safeneurons.runtime import distributed

    # imports out of the timed region: the stage modules, the model code and (ZeRO-3) DeepSpeed
    for module in ("scoring", "patching", "tracing", "evaluate", "lowrank", "models"):
        importlib.import_module(f"safeneurons.{module}")
    importlib.import_module("transformers.models.llama.modeling_llama")
    if args.zero3:
        importlib.import_module("deepspeed")
    loop = [0.0]
    time_loops(LOOPS[args.stage], loop)

    rank = distributed.init_distributed(require_process_group=args.zero3).rank
    command = json.loads(args.command)
    if args.zero3:
        command += ["--deepspeed", ZERO3]
    distributed.barrier()
    counter[0] = 0
    with open("/proc/self/statm") as statm:  # resident pages before the command: imports and process group
        baseline = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    started = time.perf_counter()
    code = cli.main([*command, "--out", args.result + ".out"])
    seconds = time.perf_counter() - started
    # this process's own high-water mark: ru_maxrss would keep the launching process's RSS at fork, which exec
    # carries into the child's (a bench that loaded a model before launching read that model in every run)
    with open("/proc/self/status") as status:
        peak = int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024
    # one file per rank: some stages end their process group themselves
    Path(f"{args.result}.{rank}").write_text(json.dumps({"seconds": seconds, "loop": loop[0], "code": code,
                                                          "bytes": counter[0], "peak": peak,
                                                          "baseline": baseline}))
    distributed.shutdown()


# ------------------------------------------------------------------ the parent

def build_models(folder: Path, args: argparse.Namespace) -> tuple[str, str]:
    """A ~100M Llama over the demo tokenizer (random init) and a copy with every weight perturbed (lineage)."""
    import torch

    from safeneurons.demo.build import make_llama
    from safeneurons.models.loading import load_tokenizer

    tokenizer = load_tokenizer("demo")
    model = make_llama(tokenizer, seed=0, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                       heads=args.hidden // 64, max_positions=256)
    paths = (folder / "model", folder / "perturbed")
    model.save_pretrained(paths[0])
    tokenizer.save_pretrained(paths[0])
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    model.save_pretrained(paths[1])
    tokenizer.save_pretrained(paths[1])
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters (hidden {args.hidden}, "
          f"{args.layers} layers, MLP {args.intermediate})")
    return str(paths[0]), str(paths[1])


def launch(stage: str, command: list[str], ranks: int, zero3: bool, result: Path) -> dict:
    worker = [str(Path(__file__).resolve()), "--stage", stage, "--command", json.dumps(command), "--result", str(result),
              *(["--zero3"] if zero3 else [])]
    launcher = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    done = subprocess.run([*launcher, *worker], env=env, capture_output=True, text=True, timeout=1200)
    wall = time.perf_counter() - started
    reports = [json.loads(Path(f"{result}.{rank}").read_text()) for rank in range(ranks)
               if Path(f"{result}.{rank}").exists()]
    if done.returncode != 0 or len(reports) < ranks or any(report["code"] for report in reports):
        raise SystemExit(f"{' '.join(command[:1])} on {ranks} rank(s){' ZeRO-3' if zero3 else ''} failed:\n"
                         f"{done.stderr[-3000:]}")
    return {"seconds": reports[0]["seconds"], "loop": max(report["loop"] for report in reports),
            "bytes": max(report["bytes"] for report in reports), "wall": wall,
            "peak": max(report["peak"] for report in reports), "ranks": reports}


def patch_sites(out: Path) -> int:
    return len(json.loads((out / "patching.json").read_text())["sites"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="wanda,wandg,patch,trace,eval,lowrank")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--trace-tokens", type=int, default=1024)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--configs", default=",".join(label for label, *_ in CONFIGS),
                        help="which runs, comma-separated (one GPU: '1 rank'; NCCL needs a GPU per rank)")
    parser.add_argument("--command", help=argparse.SUPPRESS)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--zero3", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    known = [label for label, *_ in CONFIGS]
    if not set(args.configs.split(",")) <= set(known) or "1 rank" not in args.configs.split(","):
        parser.error(f"--configs {args.configs!r}: expected '1 rank' and any of {known}, comma-separated")
    if args.command:
        run_worker(args)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        model, other = build_models(Path(scratch), args)
        commands = {size: stage_commands(model, other, args, size == "large") for size in ("default", "large")}
        print(f"{'stage':>8} {'run':>20} {'loop s':>7} {'speed-up':>8} {'stage s':>8} {'speed-up':>8} "
              f"{'wall s':>7} {'speed-up':>8} {'MB/item/rank':>12} {'peak RSS GB':>11} {'× 1 rank':>8}", flush=True)
        for stage in args.stages.split(","):
            items = commands["default"][stage][1]
            runs = {}
            for index, (label, ranks, zero3, size, options) in enumerate(CONFIGS):
                if label not in args.configs.split(","):
                    continue
                result = Path(scratch) / f"{stage}-{index}.json"
                runs[label] = launch(stage, [*commands[size][stage][0], *options], ranks, zero3, result)
                items = items or patch_sites(Path(str(result) + ".out"))
            base = runs["1 rank"]
            for label, run in runs.items():
                print(f"{stage:>8} {label:>20} {run['loop']:>7.1f} {base['loop'] / run['loop']:>8.2f} "
                      f"{run['seconds']:>8.1f} {base['seconds'] / run['seconds']:>8.2f} {run['wall']:>7.1f} "
                      f"{base['wall'] / run['wall']:>8.2f} {run['bytes'] / items / 1e6:>12.3f} "
                      f"{run['peak'] / 1e9:>11.2f} {run['peak'] / base['peak']:>8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
