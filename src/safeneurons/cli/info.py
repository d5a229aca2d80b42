"""`safeneurons info`: show how this launch is seen: launcher, ranks, backend, devices."""
from __future__ import annotations

import argparse

from safeneurons.runtime.distributed import describe_launch
from safeneurons.runtime.outputs import check_output_dir, write_json


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, metavar="DIR", help="also write DIR/launch_info.json")


def run(args: argparse.Namespace) -> None:
    """Every rank reports what it sees; rank 0 prints the table (a quick check of a cluster launch)."""
    if args.out is not None:
        check_output_dir(args.out)
    reports = describe_launch()
    if reports is None:
        return
    for report in reports:
        print(" ".join(f"{key}={value}" for key, value in report.items()))
    if args.out:
        write_json(f"{args.out}/launch_info.json", reports)
