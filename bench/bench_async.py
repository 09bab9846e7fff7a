"""Rollouts at scale on CPU: the toy demo with rollouts beside training (max_staleness) against
the synchronous loop, over seeds; and generation tokens/s on 2 FSDP2 ranks with and without
gathering the student once per rollout phase (rollout_unshard).

    python bench/bench_async.py --out bench/results/async-cpu.json
    python bench/bench_async.py --seeds 0 --staleness 0 1 --skip-unshard   # a quick look

Each demo run is its own `opd-fast demo` process (threads pinned by OPD_FAST_THREADS, so two
runs of one seed give the same records); the load average is recorded before each run. On 2
shared cores the two threads compete for the same cores: the overlap shows on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def load_average() -> float:
    with open("/proc/loadavg") as handle:
        return float(handle.read().split()[0])


def records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def demo(run_dir: str, overrides: dict, ranks: int = 1, threads: str = "2") -> dict:
    command = [sys.executable, "-m", "opd_fast", "demo", "--set", f"run_dir={run_dir}"]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    if ranks > 1:
        command += ["--nproc-per-node", str(ranks)]
    before, started = load_average(), time.perf_counter()
    env = dict(os.environ, OPD_FAST_THREADS=threads)
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"demo failed:\n{result.stderr[-4000:]}")
    with open(os.path.join(run_dir, "summary.json")) as handle:
        summary = json.load(handle)
    return {
        "summary": summary,
        "records": records(run_dir),
        "load_average_before": before,
        "load_average_after": load_average(),
        "wall_seconds": time.perf_counter() - started,
    }


def staleness_rows(folder: str, seeds: list[int], bounds: list[int]) -> list[dict]:
    rows = []
    for bound in bounds:
        for seed in seeds:
            run = demo(f"{folder}/stale{bound}-seed{seed}", {"seed": seed, "max_staleness": bound})
            train = [r for r in run["records"] if r["kind"] == "train"]
            row = {
                "max_staleness": bound,
                "seed": seed,
                "gap_recovery": run["summary"]["gap_recovery"],
                "student_acc_after": run["summary"]["student_acc_after"],
                "rollout_logprob_gap_mean": statistics.mean(
                    r["rollout_logprob_gap_mean"] for r in train
                ),
                "staleness_max": max(r.get("rollout_staleness", 0) for r in train),
                "step_seconds_median": statistics.median(r["step_seconds"] for r in train),
                "rollout_seconds_median": statistics.median(r["rollout_seconds"] for r in train),
                "overlap_ratio_last": train[-1]["overlap_ratio"],
                "load_average_before": run["load_average_before"],
                "wall_seconds": run["wall_seconds"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def unshard_rows(folder: str, steps: int) -> list[dict]:
    rows = []
    for mode in ("off", "on"):
        run = demo(
            f"{folder}/unshard-{mode}",
            {"rollout_unshard": mode, "steps": steps, "eval_every": 0},
            ranks=2,
            threads="1",
        )
        train = [r for r in run["records"] if r["kind"] == "train"]
        row = {
            "rollout_unshard": mode,
            "ranks": 2,
            "rollout_tokens_per_s_median": statistics.median(
                r["rollout_tokens_per_s"] for r in train
            ),
            "rollout_seconds_median": statistics.median(r["rollout_seconds"] for r in train),
            "load_average_before": run["load_average_before"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--unshard-steps", type=int, default=10)
    parser.add_argument("--skip-unshard", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="opd-async-")
    results = {
        "cpu_count": os.cpu_count(),
        "staleness": staleness_rows(folder, args.seeds, args.staleness),
    }
    if not args.skip_unshard:
        results["unshard"] = unshard_rows(folder, args.unshard_steps)
    print("\n| max_staleness | gap recovery (mean, min-max) | off-policy gap | staleness max | "
          "step s (median) |")  # fmt: skip
    print("|---:|---|---:|---:|---:|")
    for bound in args.staleness:
        rows = [r for r in results["staleness"] if r["max_staleness"] == bound]
        recovery = [r["gap_recovery"] for r in rows]
        gap = statistics.mean(r["rollout_logprob_gap_mean"] for r in rows)
        step = statistics.median(r["step_seconds_median"] for r in rows)
        print(f"| {bound} | {statistics.mean(recovery):.3f} ({min(recovery):.3f}-"
              f"{max(recovery):.3f}) | {gap:.2e} | {max(r['staleness_max'] for r in rows)} | "
              f"{step:.2f} |")  # fmt: skip
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
