"""`safeneurons demo-model`: write the built-in demo model and tokenizer as an HF folder."""
from __future__ import annotations

import argparse

from safeneurons.demo.build import export_demo


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from safeneurons.cli.options import add_run_arguments

    add_run_arguments(parser, seeded=False)


def run(args: argparse.Namespace) -> None:
    from safeneurons.runtime.distributed import is_main

    if is_main():
        print(export_demo(args.out))
