"""The live health check on the toy world: the demo's working pair and the mismatched pair
(teacher_other_pattern), over seeds. For each run: the health verdicts and the first step that
failed, against the run's length (the check must fire on the mismatched pair within the first
third, and never on the working pair), with gap recovery.

    python bench/bench_health.py --out bench/results/health-toy.json
    python bench/bench_health.py --recheck /tmp/opd-health-XXXX --out ...   # the checks again

--recheck runs the health check (opd_fast.training.health.check, a function of the train
records alone) anew over the metrics.jsonl of a previous invocation's runs: the same verdicts
training would log with today's thresholds, without training again.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from opd_fast.toy import toy_assets
from opd_fast.training import health
from opd_fast.training.recipes import recipe
from opd_fast.training.trainer import train


def logged_checks(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [r for r in map(json.loads, handle) if r["kind"] == "health"]


def recheck(run_dir: str, config) -> list[dict]:
    """The health records of the run's train records, computed now."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        train_rows = [r for r in map(json.loads, handle) if r["kind"] == "train"]
    window = config.health_window
    found = (
        health.check(train_rows, step, window) for step in range(window, config.steps + 1, window)
    )
    return [record for record in found if record is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recheck", metavar="FOLDER", help="a previous invocation's run folder")
    parser.add_argument("--out")
    args = parser.parse_args()
    os.environ.setdefault("OPD_FAST_THREADS", "2")
    assets = toy_assets(progress=False)
    pairs = {
        "teacher": assets.teacher_dir,
        "other_pattern": assets.teacher("teacher_other_pattern"),
    }
    folder = args.recheck or tempfile.mkdtemp(prefix="opd-health-")
    rows = []
    for name, teacher in pairs.items():
        for seed in args.seeds:
            run_dir = f"{folder}/{name}-{seed}"
            config = recipe(
                "toy_demo",
                {"teacher": teacher, "seed": seed, "run_dir": run_dir, "progress": False,
                 "checkpoint_every": 0},
            )  # fmt: skip
            if not args.recheck:
                train(config)
            with open(os.path.join(run_dir, "summary.json")) as handle:
                summary = json.load(handle)
            checks = recheck(run_dir, config) if args.recheck else logged_checks(run_dir)
            row = {
                "pair": name,
                "seed": seed,
                "steps": config.steps,
                "health_window": config.health_window,
                "verdicts": [(r["step"], r["verdict"]) for r in checks],
                "first_failing_step": next(
                    (r["step"] for r in checks if r["verdict"] == "failing"), None
                ),
                "gap_recovery": summary["gap_recovery"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
