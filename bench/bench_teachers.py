"""Several teachers on the toy world: the demo's teacher and the mismatched teacher_other_pattern
in one run, each prompt routed by a `teacher` column (even rows to one, odd rows to the
other), against single-teacher runs on the same prompts (each teacher alone on its half).
Per seed: each teacher's overlap ratio, overlap-token advantage and entropy gap, first and
over the last 10 steps, from the routed run (`overlap_ratio/<name>`) and from its
single-teacher run; then the means and seed spreads (sample std) of both.

    python bench/bench_teachers.py --out bench/results/teachers-toy.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

from opd_fast.toy import toy_assets
from opd_fast.training.metrics import MetricsLog
from opd_fast.training.recipes import recipe
from opd_fast.training.trainer import train

METRICS = ("overlap_ratio", "overlap_token_advantage", "entropy_gap")
TAIL = 10  # steps the "last" values average over


def routed_copy(source: str, target: str, names: tuple[str, str], keep: int | None = None) -> str:
    """`source`'s rows with a teacher column (even rows names[0], odd rows names[1]); with
    `keep`, only the rows routed to names[keep]."""
    with open(source) as rows, open(target, "w") as out:
        for index, line in enumerate(rows):
            row = json.loads(line)
            if keep is None:
                row["teacher"] = names[index % 2]
            elif index % 2 != keep:
                continue
            out.write(json.dumps(row) + "\n")
    return target


def dynamics(run_dir: str, suffix: str = "") -> dict:
    train_rows = [
        r for r in MetricsLog(os.path.join(run_dir, "metrics.jsonl")).read() if r["kind"] == "train"
    ]
    found = {}
    for name in METRICS:
        values = [r[name + suffix] for r in train_rows if r.get(name + suffix) is not None]
        found[f"{name}_first"] = values[0]
        found[f"{name}_last{TAIL}"] = statistics.fmean(values[-TAIL:])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out")
    args = parser.parse_args()
    os.environ.setdefault("OPD_FAST_THREADS", "2")
    assets = toy_assets(progress=False)
    names = ("teacher", "other_pattern")
    teachers = {
        "teacher": assets.teacher_dir,
        "other_pattern": assets.teacher("teacher_other_pattern"),
    }
    folder = tempfile.mkdtemp(prefix="opd-teachers-")
    data = {
        "both": {
            "train_data": routed_copy(assets.train_prompts, f"{folder}/train.jsonl", names),
            "eval_data": routed_copy(assets.eval_prompts, f"{folder}/eval.jsonl", names),
        }
    }
    for keep, name in enumerate(names):
        data[name] = {
            "train_data": routed_copy(
                assets.train_prompts, f"{folder}/train-{name}.jsonl", names, keep
            ),
            "eval_data": routed_copy(
                assets.eval_prompts, f"{folder}/eval-{name}.jsonl", names, keep
            ),
        }
    common = {"progress": False, "checkpoint_every": 0, "eval_every": 0}
    rows = []
    for seed in args.seeds:
        run_dir = f"{folder}/both-{seed}"
        train(recipe("toy_demo", {**common, **data["both"], "teachers": teachers,
                                  "seed": seed, "run_dir": run_dir}))  # fmt: skip
        for name in names:
            alone = f"{folder}/{name}-{seed}"
            train(recipe("toy_demo", {**common, **data[name], "teacher": teachers[name],
                                      "seed": seed, "run_dir": alone}))  # fmt: skip
            row = {
                "seed": seed,
                "teacher": name,
                "routed": dynamics(run_dir, f"/{name}"),
                "alone": dynamics(alone),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for name in names:
        for run in ("routed", "alone"):
            mine = [row[run] for row in rows if row["teacher"] == name]
            summary[f"{name}/{run}"] = {
                key: {
                    "mean": statistics.fmean(r[key] for r in mine),
                    "std": statistics.stdev(r[key] for r in mine) if len(mine) > 1 else None,
                }
                for key in mine[0]
            }
    print(json.dumps(summary, indent=1))
    if args.out:
        load = os.getloadavg()
        with open(args.out, "w") as handle:
            json.dump(
                {"rows": rows, "summary": summary, "load_average_end": load}, handle, indent=1
            )


if __name__ == "__main__":
    main()
