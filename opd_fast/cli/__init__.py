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
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)

    add_train_commands(commands)
    add_export_parser(commands)
    add_serve_teacher_parser(commands)
    add_paper_commands(commands)
    for command in commands.choices.values():  # `opd-fast train --debug` works too
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    return parser


def _exit_code(error: BaseException) -> int | None:
    """The exit status of an expected failure (a message, no traceback), or None for a bug.

    2: bad input (config, paths, data, arguments). 3: training diverged. 1: the outside world
    failed (a teacher server that cannot be reached, a checkpoint that cannot be used, the
    file system)."""
    from opd_fast.teachers.http import TeacherError
    from opd_fast.training.trainer import TrainingDiverged

    if isinstance(error, TrainingDiverged):
        return 3
    if isinstance(error, ValueError):  # CheckpointError included
        return 2
    if isinstance(error, (TeacherError, OSError, ImportError)):  # ImportError: a missing extra
        return 1
    return None


def _rank_label() -> str:
    """' (rank N)' in a process torchrun started, else ''."""
    return f" (rank {env_rank()})" if launched_by_torchrun() else ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for a relaunch under torchrun
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("opd-fast: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        code = _exit_code(error)
        if code is None or args.debug:
            if launched_by_torchrun():  # say which rank failed, then the traceback
                print(f"opd-fast: rank {env_rank()} failed: {error!r}", file=sys.stderr)
            raise
        print(f"opd-fast: error{_rank_label()}: {error}", file=sys.stderr)
        print("opd-fast: (run with --debug for the traceback)", file=sys.stderr)
        return code
