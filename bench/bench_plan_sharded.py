"""Does `plan` predict what a layer-sharded score holds per rank? `score --shard layers` on 2 stages (one thread
per rank, bf16, the dtype plan counts in) beside plan's figures for the same model folder and workload, stage by
stage: the measured growth of each rank's peak RSS over its RSS before the command (the imports and the
process group), against plan's weights + activations + wandg sums of that stage.

    python bench/bench_plan_sharded.py                    # the 0.4B Llama of the issue (about 3 minutes)
    python bench/bench_plan_sharded.py --hidden 768 --layers 14 --intermediate 2048   # the 100M one
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench_distributed import build_models, launch


def to_bfloat16(folder: str) -> None:
    """The checkpoint in the dtype it is scored in, as a bf16 hub checkpoint is: loading converts nothing."""
    from safetensors.torch import load_file, save_file

    for path in Path(folder).glob("*.safetensors"):
        save_file({name: tensor.bfloat16() for name, tensor in load_file(str(path)).items()}, str(path),
                  metadata={"format": "pt"})


def plan_stages(folder: str, stages: int, args: argparse.Namespace) -> list:
    from safeneurons.workflows.plan import Cluster, Workload, sharded_inputs
    from safeneurons.workflows.plan_model import model_shape
    from safeneurons.workflows.plan_layers import sharded_score_stages

    workload = Workload(score_batch_size=args.batch_size, max_length=args.max_length)
    return sharded_score_stages(sharded_inputs(model_shape(folder), Cluster(1, stages), workload))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--stages", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model, _ = build_models(Path(scratch), args)
        to_bfloat16(model)
        command = ["score", "--model", model, "--method", "wandg", "--data", "demo-align", "--nsamples",
                   str(args.nsamples), "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
                   "--dtype", "bfloat16", "--shard", "layers"]
        run = launch("wandg", command, args.stages, False, Path(scratch) / "plan-check.json")
        predicted = plan_stages(model, args.stages, args)
        print(f"{'stage':>5} {'layers':>8} {'measured GiB':>12} {'plan GiB':>9} {'weights':>8} {'activ.':>7} "
              f"{'sums':>6} {'measured/plan':>13}")
        for stage, (report, plan) in enumerate(zip(run["ranks"], predicted)):
            grown = (report["peak"] - report["baseline"]) / 2 ** 30
            print(f"{stage:>5} {plan.layers.start:>3}-{plan.layers.stop - 1:<4} {grown:>12.2f} "
                  f"{plan.total / 2 ** 30:>9.2f} {plan.weights / 2 ** 30:>8.2f} {plan.activations / 2 ** 30:>7.2f} "
                  f"{plan.sums / 2 ** 30:>6.2f} {grown / (plan.total / 2 ** 30):>13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
