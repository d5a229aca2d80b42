"""`python -m safeneurons.demo build|build-judge|build-smollm2-safe --out DIR`: rebuild the shipped demo models
and smollm2-safe's adapter bit for bit; `build-smollm2-attack --out FILE.csv`: the real pair's harmful attack."""
from __future__ import annotations

import argparse
import logging

from safeneurons.demo.build import DemoBuild, build_demo
from safeneurons.demo.judge import JudgeBuild, build_judge
from safeneurons.demo.smollm2_attack import AttackBuild, build_smollm2_attack


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m safeneurons.demo", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["build", "build-moe", "build-judge", "build-smollm2-safe",
                                           "build-smollm2-attack"],
                        help="build: demo-base and demo-chat (DIR/base, DIR/chat); build-moe: demo-moe-base and "
                             "demo-moe-chat (DIR/base, DIR/chat); build-judge: the demo judge; "
                             "build-smollm2-safe: smollm2-safe's LoRA adapter (needs --align); "
                             "build-smollm2-attack: the real pair's harmful attack CSV (needs --advbench)")
    parser.add_argument("--align", default=None, help="build-smollm2-safe: the original work's align CSV")
    parser.add_argument("--advbench", default=None, help="build-smollm2-attack: AdvBench's harmful behaviours")
    parser.add_argument("--count", type=int, default=AttackBuild.count,
                        help="build-smollm2-attack: compliant answers to keep (default %(default)s)")
    parser.add_argument("--first-line", type=int, default=AttackBuild.first_line,
                        help="build-smollm2-attack: the first AdvBench line to answer (default %(default)s)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=None,
                        help=f"pretraining steps (default {DemoBuild.steps}; the judge's {JudgeBuild.steps})")
    parser.add_argument("--chat-steps", type=int, default=DemoBuild.chat_steps,
                        help="demo-chat's safety-alignment steps (default %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.action == "build-smollm2-safe":
        from safeneurons.demo.smollm2_safe import build_smollm2_safe

        if not args.align:
            parser.error("build-smollm2-safe needs --align FILE (the original work's align CSV)")
        print(build_smollm2_safe(args.align, args.out))
        return
    if args.action == "build-smollm2-attack":
        if not args.advbench:
            parser.error("build-smollm2-attack needs --advbench FILE (AdvBench's harmful behaviours)")
        print(build_smollm2_attack(args.advbench, args.out, AttackBuild(first_line=args.first_line, count=args.count)))
        return
    if args.action == "build-judge":
        print(build_judge(args.out, JudgeBuild(steps=args.steps or JudgeBuild.steps)))
        return
    if args.action == "build-moe":
        from safeneurons.demo.moe import MoeDemoBuild, build_demo_moe

        pair = build_demo_moe(args.out, MoeDemoBuild(steps=args.steps or DemoBuild.steps, chat_steps=args.chat_steps))
        print(f"demo-moe-chat: {pair.chat}\ndemo-moe-base: {pair.base}")
        return
    pair = build_demo(args.out, DemoBuild(steps=args.steps or DemoBuild.steps, chat_steps=args.chat_steps))
    print(f"demo-chat: {pair.chat}\ndemo-base: {pair.base}")
