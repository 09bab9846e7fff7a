"""`opd-fast train`, `demo` and `config`: running OPD from a config, and what it prints."""

from __future__ import annotations

import argparse
import json
import time

from opd_fast.training.config import field_names, load_config, parse_overrides


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config key (repeatable); keys: {', '.join(field_names())}",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        metavar="N",
        help="run on N ranks of this machine through torchrun (FSDP2; multi-node: run "
        "torchrun yourself, see docs/distributed.md)",
    )


def _world_size(args) -> int | None:
    """The ranks the command will run on, for validating the config before torchrun starts
    (None: as the environment says)."""
    from opd_fast.training.distributed import launched_by_torchrun

    return None if launched_by_torchrun() else args.nproc_per_node


def _relaunch(args) -> int | None:
    """With --nproc-per-node outside torchrun: this command again under torchrun, its exit
    code; else None (run here)."""
    from opd_fast.training.distributed import launch, launched_by_torchrun

    if args.nproc_per_node is None or launched_by_torchrun():
        return None
    argv, skip = [], False
    for token in args.argv:
        if skip:
            skip = False
        elif token == "--nproc-per-node":
            skip = True
        elif not token.startswith("--nproc-per-node="):
            argv.append(token)
    return launch(args.nproc_per_node, argv)


def _leave_process_group() -> None:
    """Under torchrun: wait for the other ranks, then leave (no-op in a single process)."""
    from opd_fast.training.distributed import shutdown

    shutdown()


def _is_main() -> bool:
    from opd_fast.training.distributed import env_rank

    return env_rank() == 0


def _format(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def print_summary(summary: dict, run_dir: str) -> None:
    rows = [
        ("student accuracy before", summary.get("student_acc_before")),
        ("student accuracy after", summary.get("student_acc_after")),
        ("teacher accuracy", summary.get("teacher_acc")),
        ("gap recovery", summary.get("gap_recovery")),
    ]
    for name in (
        "overlap_ratio",
        "overlap_token_advantage",
        "entropy_gap",
        "overlap_mass_student",
        "student_topk_mass",
        "loss",
    ):
        first, last = summary.get(f"{name}_first"), summary.get(f"{name}_last")
        rows.append((f"{name} first -> last", f"{_format(first)} -> {_format(last)}"))
    for key in sorted(summary):  # several teachers: each one's accuracy and dynamics
        if key.startswith("teacher_accuracy/"):
            rows.append((key, summary[key]))
        elif "/" in key and key.endswith("_first"):
            name = key[: -len("_first")]
            first, last = summary[key], summary.get(f"{name}_last")
            rows.append((f"{name} first -> last", f"{_format(first)} -> {_format(last)}"))
    rows.append(("wall seconds", summary.get("wall_seconds")))
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"  {name:<{width}}  {_format(value)}")
    print(f"\n  run folder: {run_dir} (metrics.jsonl, summary.json, dynamics.png, checkpoints/)")


def _train(args) -> int:
    from opd_fast.training.trainer import train

    overrides = parse_overrides(args.overrides)
    if args.recipe is not None:
        from opd_fast.training.recipes import get_recipe

        if args.config is not None:
            raise ValueError("train: give --recipe or --config, not both (--set changes a recipe)")
        config = get_recipe(args.recipe).config(overrides, world_size=_world_size(args))
    else:
        config = load_config(args.config, overrides, world_size=_world_size(args))
    relaunched = _relaunch(args)
    if relaunched is not None:
        return relaunched
    summary = train(config, resume=args.resume)
    _leave_process_group()
    if _is_main():
        print_summary(summary, config.run_dir)
    return 0


def _demo(args) -> int:
    from opd_fast.training.recipes import recipe
    from opd_fast.training.trainer import train

    started = time.perf_counter()
    config = recipe("toy_demo", parse_overrides(args.overrides), world_size=_world_size(args))
    relaunched = _relaunch(args)
    if relaunched is not None:
        return relaunched
    if not _is_main():
        train(config, resume=args.resume)
        _leave_process_group()
        return 0
    print(
        "opd-fast demo: building/loading the embedded toy world, then distilling the teacher "
        "into the student on the student's own rollouts",
        flush=True,
    )
    summary = train(config, resume=args.resume)
    _leave_process_group()
    summary["demo_wall_seconds"] = time.perf_counter() - started
    print_summary(summary, config.run_dir)
    print(f"  demo wall time (including the toy-world build): {summary['demo_wall_seconds']:.1f} s")
    return 0


def _recipes(args) -> int:
    from opd_fast.training.recipes import recipe_table

    rows = recipe_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = ("name", "pair", "hardware", "memory", "time")
    widths = {name: max(len(name), *(len(str(row[name])) for row in rows)) for name in columns}
    print("  ".join(f"{name:<{widths[name]}}" for name in columns).rstrip())
    for row in rows:
        print("  ".join(f"{str(row[name]):<{widths[name]}}" for name in columns).rstrip())
    print("\nopd-fast train --recipe NAME [--set KEY=VALUE ...]; estimates: docs/recipes.md")
    return 0


def add_train_commands(commands) -> None:
    train_parser = commands.add_parser("train", help="run OPD training from a YAML/JSON config")
    train_parser.add_argument("--config", help="YAML or JSON file of TrainConfig keys")
    train_parser.add_argument(
        "--recipe", metavar="NAME", help="a shipped recipe (opd-fast recipes lists them)"
    )
    _add_config_arguments(train_parser)
    train_parser.set_defaults(handler=_train)

    demo_parser = commands.add_parser(
        "demo", help="end-to-end OPD on the embedded toy world (CPU, a few minutes)"
    )
    _add_config_arguments(demo_parser)
    demo_parser.set_defaults(handler=_demo)

    recipes_parser = commands.add_parser(
        "recipes", help="the shipped recipes: pair, hardware, memory and time to expect"
    )
    recipes_parser.add_argument("--json", action="store_true", help="as JSON")
    recipes_parser.set_defaults(handler=_recipes)

    config_parser = commands.add_parser("config", help="print the default config as JSON")
    config_parser.set_defaults(
        handler=lambda args: print(json.dumps(load_config().to_dict(), indent=2)) or 0
    )
