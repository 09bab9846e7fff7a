"""Several teachers on the toy world: two teachers in one run, each prompt routed by a
`teacher` column, against single-teacher runs on the same prompts (each teacher alone on its
half). Per seed: each teacher's overlap ratio, overlap-token advantage and entropy gap, first
and over the last 10 steps, from the routed run (`overlap_ratio/<name>`) and from its
single-teacher run; then the means and seed spreads (sample std) of both.

--pair other_pattern (default): the demo's teacher and the mismatched teacher_other_pattern.
--pair same: the demo's teacher under two names, the control: with nothing to conflict, each
name's dynamics should follow the single-teacher run's.
--route alternate (default): even rows to the first teacher, odd rows to the second; the
student cannot tell from a prompt which teacher scores it. --route operand: by the parity of
the prompt's operand ("what is e017 plus 4 ?"), which the student sees.

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


def route_of(row: dict, index: int, route: str) -> int:
    """Which of the two teachers (0 or 1) scores `row`, the `index`-th row of its file."""
    if route == "alternate":
        return index % 2
    if route == "operand":
        operand = row["prompt"].split(" plus ")[1].split()[0]
        return int(operand) % 2
    raise ValueError(f"unknown route {route!r}")


def routed_copy(
    source: str, target: str, names: tuple[str, str], route: str, keep: int | None = None
) -> str:
    """`source`'s rows with a teacher column naming the teacher `route` picks; with `keep`,
    only the rows routed to names[keep]."""
    with open(source) as rows, open(target, "w") as out:
        for index, line in enumerate(rows):
            row = json.loads(line)
            chosen = route_of(row, index, route)
            if keep is None:
                row["teacher"] = names[chosen]
            elif chosen != keep:
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
    parser.add_argument("--pair", choices=("other_pattern", "same"), default="other_pattern")
    parser.add_argument("--route", choices=("alternate", "operand"), default="alternate")
    parser.add_argument("--out")
    args = parser.parse_args()
    os.environ.setdefault("OPD_FAST_THREADS", "2")
    assets = toy_assets(progress=False)
    if args.pair == "same":
        names = ("teacher", "teacher_b")
        teachers = {"teacher": assets.teacher_dir, "teacher_b": assets.teacher_dir}
    else:
        names = ("teacher", "other_pattern")
        teachers = {
            "teacher": assets.teacher_dir,
            "other_pattern": assets.teacher("teacher_other_pattern"),
        }
    folder = tempfile.mkdtemp(prefix="opd-teachers-")
    data = {
        "both": {
            "train_data": routed_copy(
                assets.train_prompts, f"{folder}/train.jsonl", names, args.route
            ),
            "eval_data": routed_copy(
                assets.eval_prompts, f"{folder}/eval.jsonl", names, args.route
            ),
        }
    }
    for keep, name in enumerate(names):
        data[name] = {
            "train_data": routed_copy(
                assets.train_prompts, f"{folder}/train-{name}.jsonl", names, args.route, keep
            ),
            "eval_data": routed_copy(
                assets.eval_prompts, f"{folder}/eval-{name}.jsonl", names, args.route, keep
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
                {
                    "pair": args.pair,
                    "route": args.route,
                    "rows": rows,
                    "summary": summary,
                    "load_average_end": load,
                },
                handle,
                indent=1,
            )


if __name__ == "__main__":
    main()
