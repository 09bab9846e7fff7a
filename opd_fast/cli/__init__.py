"""The opd-fast command line: one subcommand per module here. `train` (train, demo, config),
`export`, `paper` (probe, sft, dedup, diagnose, repro), `serve` (serve-teacher). Argument
parsing and printing only: the work is done by opd_fast.training, opd_fast.paper and
opd_fast.serving.

Imports: everything below it; nothing imports it.
"""

from __future__ import annotations

import argparse
import sys

from opd_fast.cli.export import add_export_parser
from opd_fast.cli.paper import add_paper_commands
from opd_fast.cli.serve import add_serve_teacher_parser
from opd_fast.cli.train import add_train_commands
from opd_fast.training.distributed import env_rank, launched_by_torchrun


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opd-fast", description="Fast on-policy distillation of language models."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    add_train_commands(commands)
    add_export_parser(commands)
    add_serve_teacher_parser(commands)
    add_paper_commands(commands)
    return parser


def _rank_label() -> str:
    """' (rank N)' in a process torchrun started, else ''."""
    return f" (rank {env_rank()})" if launched_by_torchrun() else ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for a relaunch under torchrun
    try:
        return args.handler(args)
    except ValueError as error:  # bad config, paths, data: a message, not a traceback
        print(f"opd-fast: error{_rank_label()}: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # under torchrun: say which rank failed, then the traceback
        if launched_by_torchrun():
            print(f"opd-fast: rank {env_rank()} failed: {error!r}", file=sys.stderr)
        raise
    except KeyboardInterrupt:
        print("opd-fast: interrupted", file=sys.stderr)
        return 130
