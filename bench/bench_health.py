"""The live health check on the toy world: the demo's working pair and the mismatched pair
(teacher_other_pattern), over seeds. For each run: the health verdicts and the first step that
failed, against the run's length (the check must fire on the mismatched pair within the first
third, and never on the working pair), with gap recovery.

    python bench/bench_health.py --out bench/results/health-toy.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from opd_fast.toy import toy_assets
from opd_fast.training.recipes import recipe
from opd_fast.training.trainer import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out")
    args = parser.parse_args()
    os.environ.setdefault("OPD_FAST_THREADS", "2")
    assets = toy_assets(progress=False)
    pairs = {
        "teacher": assets.teacher_dir,
        "other_pattern": assets.teacher("teacher_other_pattern"),
    }
    folder = tempfile.mkdtemp(prefix="opd-health-")
    rows = []
    for name, teacher in pairs.items():
        for seed in args.seeds:
            run_dir = f"{folder}/{name}-{seed}"
            config = recipe(
                "toy_demo",
                {"teacher": teacher, "seed": seed, "run_dir": run_dir, "progress": False,
                 "checkpoint_every": 0},
            )  # fmt: skip
            summary = train(config)
            with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
                checks = [r for r in map(json.loads, handle) if r["kind"] == "health"]
            row = {
                "pair": name,
                "seed": seed,
                "steps": config.steps,
                "health_window": config.health_window,
                "verdicts": [(r["step"], r["verdict"]) for r in checks],
                "first_failing_step": summary.get("health_first_failing_step"),
                "gap_recovery": summary["gap_recovery"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
