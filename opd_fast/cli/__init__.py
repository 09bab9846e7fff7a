"""The opd-fast command line: one subcommand per module here. `train` (train, demo, config),
`paper` (probe, sft, dedup, diagnose, repro), `serve` (serve-teacher). Argument parsing and
printing only: the work is done by opd_fast.training, opd_fast.paper and opd_fast.serving.

Imports: everything below it; nothing imports it.
"""

from __future__ import annotations

import argparse
import sys

from opd_fast.cli.paper import add_paper_commands
from opd_fast.cli.serve import add_serve_teacher_parser
from opd_fast.cli.train import add_train_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opd-fast", description="Fast on-policy distillation of language models."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    add_train_commands(commands)
    add_serve_teacher_parser(commands)
    add_paper_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as error:  # bad config, paths, data: a message, not a traceback
        print(f"opd-fast: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("opd-fast: interrupted", file=sys.stderr)
        return 130
