"""opd-fast repro: the paper's findings (docs/math.md, Reading the dynamics) on the toy world.

The grid is fixed here, before any result is seen, and is not tuned afterwards:
  (a) thinking-pattern consistency: teacher (same response pattern as the student) vs
      teacher_other_pattern (same knowledge, different pattern)
  (b) new knowledge: teacher (knows every entity) vs teacher_same_pipeline (trained on exactly
      the student's data, larger)
  (c) token sets: student_topk vs overlap_topk vs nonoverlap_topk, with the teacher of (a)
  (d) off-policy cold start (SFT on teacher outputs, then OPD) on the pair of (a) that fails
  (losses) which loss learns best, with the teacher of (a): Student Top-k with the demo's
      `exact` estimator (the run "teacher") vs the full-vocabulary reverse KL, the sampled
      token's KL (`pg`) and Student Top-k with the `tail` estimator, with each one's time and
      peak memory per step
Every run uses the toy demo's schedule (opd_fast.training.recipes.TOY_DEMO) and is repeated
over seeds (the OPD seed: rollouts, data order). A finding "reproduces" when its effect has the
paper's sign and the difference of the means exceeds the larger of the two standard deviations.
Writes repro.json, repro.md (table, means and spreads, the paper's direction beside ours) and
repro.png into the output folder; finished runs are reused when it is run again.
`world` picks the toy world the grid runs on (opd_fast.toy.spec.WORLDS: "default", the
embedded one, "graded", where the student half-knows the entities it was not taught and the
teacher's phrasing does not drift, or "graded_drift" / "no_drift", each with one of those two
changes).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass

from opd_fast.training.recipes import TOY_DEMO

SEEDS = 3
QUICK_SEEDS = 1
QUICK_STEPS = 10


@dataclass(frozen=True)
class RunSpec:
    name: str
    teacher: str  # a toy-world model name
    variant: str = "student_topk"
    cold_start: bool = False
    estimator: str | None = None  # None: the demo's (TOY_DEMO["estimator"])


RUNS = (
    RunSpec("teacher", "teacher"),
    RunSpec("other_pattern", "teacher_other_pattern"),
    RunSpec("same_pipeline", "teacher_same_pipeline"),
    RunSpec("overlap_topk", "teacher", variant="overlap_topk"),
    RunSpec("nonoverlap_topk", "teacher", variant="nonoverlap_topk"),
    RunSpec("other_pattern_cold_start", "teacher_other_pattern", cold_start=True),
    RunSpec("full_vocab", "teacher", variant="full_vocab"),
    RunSpec("sampled_token", "teacher", variant="sampled_token", estimator="pg"),
    RunSpec("student_topk_tail", "teacher", estimator="tail"),
)

# The losses compared in the table "Losses": the demo's loss first.
LOSS_RUNS = ("teacher", "full_vocab", "sampled_token", "student_topk_tail")

# (finding, what is compared, run that should win, run that should lose, metric, paper, test):
# test "beats": the first run's mean above the second's by more than the seed spread; test
# "keeps": the first run's mean at KEEPS_SHARE of the second's or more (judge_keeps).
FINDINGS = (
    (
        "a",
        "thinking-pattern consistency",
        "teacher",
        "other_pattern",
        "gap_recovery",
        "the teacher sharing the student's pattern distils better",
        "beats",
    ),
    (
        "a",
        "initial overlap (predictor)",
        "teacher",
        "other_pattern",
        "overlap_ratio_first",
        "the compatible teacher starts with higher top-k overlap",
        "beats",
    ),
    (
        "b",
        "new knowledge",
        "teacher",
        "same_pipeline",
        "accuracy_gain",
        "a same-pipeline teacher gives little or no gain, one with new knowledge a large one",
        "beats",
    ),
    (
        "c",
        "overlap keeps student top-k's benefit",
        "overlap_topk",
        "teacher",
        "gap_recovery",
        "Overlap Top-k keeps nearly all of Student Top-k's benefit",
        "keeps",
    ),
    (
        "c",
        "overlap vs non-overlap top-k",
        "overlap_topk",
        "nonoverlap_topk",
        "gap_recovery",
        "Overlap Top-k beats Non-Overlap Top-k",
        "beats",
    ),
    (
        "c",
        "student vs non-overlap top-k",
        "teacher",
        "nonoverlap_topk",
        "gap_recovery",
        "Student Top-k beats Non-Overlap Top-k",
        "beats",
    ),
    (
        "d",
        "cold start rescues the failing pair",
        "other_pattern_cold_start",
        "other_pattern",
        "gap_recovery",
        "SFT on teacher outputs, then OPD, rescues a weak pair",
        "beats",
    ),
    (
        "d",
        "cold start raises initial overlap",
        "other_pattern_cold_start",
        "other_pattern",
        "overlap_ratio_first",
        "cold start gives higher initial overlap",
        "beats",
    ),
)

# The cold start of (d): SFT steps on teacher responses before OPD.
COLD_START = {
    "cold_start_steps": 60,
    "cold_start_lr": 3e-3,
    "cold_start_batch_size": 32,
    "cold_start_responses_per_prompt": 1,
}


def _config(assets, spec: RunSpec, seed: int, run_dir: str, quick: bool):
    from opd_fast.training.config import make_config

    values = {
        **TOY_DEMO,
        "teacher": assets.teacher(spec.teacher),
        "variant": spec.variant,
        "estimator": spec.estimator or TOY_DEMO["estimator"],
        "seed": seed,
        "run_dir": run_dir,
        "progress": False,
        "checkpoint_every": 0,
    }
    if quick:
        values.update(steps=QUICK_STEPS, eval_every=0)
    if spec.cold_start:
        values.update(COLD_START)
        if quick:
            values["cold_start_steps"] = 20
    return make_config(values)


def _run(assets, spec: RunSpec, seed: int, out_dir: str, quick: bool) -> dict:
    from opd_fast.training.metrics import MetricsLog
    from opd_fast.training.trainer import train

    run_dir = os.path.join(out_dir, spec.name, f"seed_{seed}")
    summary_path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(summary_path):
        train(_config(assets, spec, seed, run_dir, quick))
    with open(summary_path) as handle:
        summary = json.load(handle)
    records = MetricsLog(os.path.join(run_dir, "metrics.jsonl")).read()
    evals = [r for r in records if r.get("kind") == "eval"]
    # After a cold start, the second step-0 eval is the student OPD starts from.
    start = evals[1] if spec.cold_start and len(evals) > 1 else evals[0]
    summary["accuracy_gain"] = summary["student_acc_after"] - summary["student_acc_before"]
    summary["opd_start_accuracy"] = start["student_accuracy"]
    train = [r for r in records if r.get("kind") == "train"]
    summary["overlap_curve"] = [(r["step"], r["overlap_ratio"]) for r in train]
    # The loss's cost: the median step time and score time (the teacher's and the student's
    # forwards, the loss, the backward), and the largest training-phase peak memory.
    for key in ("step_seconds", "score_seconds"):
        values = [r[key] for r in train if r.get(key) is not None]
        summary[f"{key}_median"] = statistics.median(values) if values else None
    peaks = [r["train_peak_memory_mib"] for r in train if r.get("train_peak_memory_mib")]
    summary["train_peak_memory_mib"] = max(peaks) if peaks else None
    return summary


def _stats(values: list[float | None]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.mean(values), spread


def _seeds_of_both(first: list, second: list) -> int:
    """How many seeds each of two runs measured, the fewer of the two."""
    return min(sum(v is not None for v in first), sum(v is not None for v in second))


def judge(winner: list, loser: list) -> tuple[str, float | None]:
    """'reproduced' / 'not reproduced' / 'opposite', and the difference of means. With one
    seed there is no spread to compare against: only the direction is reported."""
    (mean_w, spread_w), (mean_l, spread_l) = _stats(winner), _stats(loser)
    if mean_w is None or mean_l is None:
        return "undefined (no gap to recover)", None
    difference = mean_w - mean_l
    if _seeds_of_both(winner, loser) < 2:
        sign = "same direction as" if difference > 0 else "not the direction of"
        return f"{sign} the paper (1 seed: no spread, not a test)", difference
    if difference > max(spread_w, spread_l) and difference > 0:
        return "reproduced", difference
    if difference < 0 and -difference > max(spread_w, spread_l):
        return "opposite", difference
    return "not reproduced (within seed spread)", difference


KEEPS_SHARE = 0.9  # "keeps nearly all": at least 90% of the reference's mean


def judge_keeps(kept: list, reference: list) -> tuple[str, float | None]:
    """Whether `kept` keeps nearly all of `reference`'s result: 'reproduced' when its mean
    falls short of the reference's by at most 1 - KEEPS_SHARE of it (or is above it), 'not
    reproduced' when it falls short by more than that and by more than the larger seed
    spread, else 'not reproduced (within seed spread)'; and the difference of means."""
    (mean_k, spread_k), (mean_r, spread_r) = _stats(kept), _stats(reference)
    if mean_k is None or mean_r is None:
        return "undefined (no gap to recover)", None
    difference = mean_k - mean_r
    keeps = -difference <= (1 - KEEPS_SHARE) * abs(mean_r)
    if _seeds_of_both(kept, reference) < 2:
        sign = "same direction as" if keeps else "not the direction of"
        return f"{sign} the paper (1 seed: no spread, not a test)", difference
    if keeps:
        return "reproduced", difference
    if -difference > max(spread_k, spread_r):
        return "not reproduced", difference
    return "not reproduced (within seed spread)", difference


def _estimator(spec: RunSpec) -> str:
    return spec.estimator or TOY_DEMO["estimator"]


def loss_table(results: dict[str, list[dict]]) -> list[str]:
    """The report's "Losses" section: each loss's learning and cost, and which learns best
    (the highest mean gap recovery; "within seed spread" when its lead over the next is not
    larger than either one's spread)."""
    specs = {spec.name: spec for spec in RUNS}
    names = [name for name in LOSS_RUNS if results.get(name)]
    if len(names) < 2:
        return []
    lines = [
        "",
        "## Losses",
        "",
        "| run | variant | estimator | gap recovery | acc after | overlap first -> last | "
        "step s (median) | score+backward s (median) | train peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        rows, spec = results[name], specs[name]

        def cell(key, digits=3, rows=rows):
            mean, spread = _stats([r.get(key) for r in rows])
            return "n/a" if mean is None else f"{mean:.{digits}f} ± {spread:.{digits}f}"

        first, last = (
            _stats([r.get("overlap_ratio_first") for r in rows])[0],
            _stats([r.get("overlap_ratio_last") for r in rows])[0],
        )
        overlap = "n/a" if first is None or last is None else f"{first:.3f} -> {last:.3f}"
        lines.append(
            f"| {name} | {spec.variant} | {_estimator(spec)} | {cell('gap_recovery')} | "
            f"{cell('student_acc_after')} | {overlap} | {cell('step_seconds_median', 2)} | "
            f"{cell('score_seconds_median', 2)} | {cell('train_peak_memory_mib', 0)} |"
        )
    ranked = sorted(
        (name for name in names if _stats([r.get("gap_recovery") for r in results[name]])[0]
         is not None),
        key=lambda name: -_stats([r.get("gap_recovery") for r in results[name]])[0],
    )  # fmt: skip
    if len(ranked) >= 2:
        best, runner_up = ranked[:2]
        verdict, difference = judge(
            [r.get("gap_recovery") for r in results[best]],
            [r.get("gap_recovery") for r in results[runner_up]],
        )
        beyond = verdict == "reproduced"
        lines += [
            "",
            f"Highest mean gap recovery: {best}, "
            f"{'ahead of' if beyond else 'not clearly ahead of'} {runner_up} (difference "
            f"{difference:+.3f}, {'beyond' if beyond else 'within'} the seed spread).",
        ]
    lines += [
        "",
        "Times are wall-clock seconds under whatever load the machine had during each run: "
        "compare them only between runs of one invocation on a quiet machine.",
    ]
    return lines


def _fmt(mean, spread) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.3f} ± {spread:.3f}"


def write_report(
    results: dict[str, list[dict]],
    out_dir: str,
    seeds: int,
    wall: float,
    world: dict,
    world_name: str = "default",
) -> str:
    run_minutes = sum(r.get("wall_seconds", 0.0) for rows in results.values() for r in rows) / 60
    title = "the embedded toy world" if world_name == "default" else f"the toy world {world_name!r}"
    lines = [f"# OPD findings on {title}", ""]
    lines += [
        f"Seeds per run: {seeds}. Wall time of the invocation that wrote this report: "
        f"{wall / 60:.1f} min (runs finished by an earlier invocation are reused, not re-timed); "
        f"the training runs' own wall times add up to {run_minutes:.1f} min. Values are mean ± "
        "standard deviation over seeds. Grid fixed in opd_fast/paper/repro.py before running.",
        "",
        "## Runs",
        "",
        "| run | teacher | variant | estimator | cold start | acc before | acc at OPD start | "
        "acc after | teacher acc | gap recovery | overlap first | overlap last |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for spec in RUNS:
        rows = results.get(spec.name, [])
        if not rows:
            continue
        cells = [
            _fmt(*_stats([r.get(key) for r in rows]))
            for key in (
                "student_acc_before",
                "opd_start_accuracy",
                "student_acc_after",
                "teacher_acc",
                "gap_recovery",
                "overlap_ratio_first",
                "overlap_ratio_last",
            )
        ]
        lines.append(
            f"| {spec.name} | {spec.teacher} | {spec.variant} | {_estimator(spec)} | "
            f"{'yes' if spec.cold_start else 'no'} | " + " | ".join(cells) + " |"
        )
    if any(winner in results and loser in results for _, _, winner, loser, *_ in FINDINGS):
        lines += [
            "",
            "## Findings",
            "",
            "| | finding | metric | ours (winner vs loser) | paper's direction | verdict |",
            "|---|---|---|---|---|---|",
        ]
    seen_instead = []
    for key, finding, winner, loser, metric, paper, test in FINDINGS:
        if winner not in results or loser not in results:
            continue
        win = [r.get(metric) for r in results[winner]]
        lose = [r.get(metric) for r in results[loser]]
        verdict, difference = (judge if test == "beats" else judge_keeps)(win, lose)
        win_stats, lose_stats = _stats(win), _stats(lose)
        lines.append(
            f"| ({key}) | {finding} | {metric} | {winner} {_fmt(*win_stats)} vs "
            f"{loser} {_fmt(*lose_stats)} | {paper} | {verdict} |"
        )
        if verdict != "reproduced" and difference is not None:
            spread = max(win_stats[1], lose_stats[1])
            expects = "above" if test == "beats" else f"at {KEEPS_SHARE:.0%} or more of"
            seen_instead.append(
                f"- ({key}) {finding}: the paper expects run {winner} {expects} run {loser} in "
                f"{metric}; we saw {_fmt(*win_stats)} and {_fmt(*lose_stats)}, a "
                f"difference of {difference:+.3f} against a seed spread of up to {spread:.3f}."
            )
    if seen_instead:
        lines += ["", "## Not reproduced: what we saw instead", "", *seen_instead]
    lines += loss_table(results)
    lines += [
        "",
        "Notes:",
        "- gap recovery = (acc_after - acc_before) / (teacher_acc - acc_before); it is "
        "undefined when the teacher is no better than the student (same-pipeline "
        "teacher), hence (b) compares the accuracy gain.",
        "- For the cold-start runs, 'acc before' is the student before SFT and 'acc at "
        "OPD start' after it: part of their gain comes from the SFT itself.",
        f"- Toy world {world.get('key', '?')} (format {world.get('format_version', '?')}); its "
        "full spec is in repro.json.",
    ]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "repro.md"), "w") as handle:
        handle.write(text)
    return text


def plot_repro(results: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [spec.name for spec in RUNS if spec.name in results]
    figure, (bars, curves) = plt.subplots(1, 2, figsize=(13, 4.5))
    for index, name in enumerate(names):
        values = [r["gap_recovery"] for r in results[name] if r.get("gap_recovery") is not None]
        if values:
            bars.bar(index, statistics.mean(values), color="tab:blue", alpha=0.7)
            bars.scatter([index] * len(values), values, color="black", s=12, zorder=3)
        for run in results[name][:1]:
            steps = [s for s, _ in run["overlap_curve"]]
            curves.plot(steps, [v for _, v in run["overlap_curve"]], label=name)
    bars.set_xticks(range(len(names)), names, rotation=25, fontsize=8)
    bars.set_title("gap recovery (bars: mean, dots: seeds)")
    bars.axhline(0, color="gray", linewidth=0.8)
    curves.set_title("overlap ratio over steps (first seed)")
    curves.set_xlabel("step")
    curves.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_repro(
    out_dir: str = "runs/repro",
    quick: bool = False,
    seeds: int | None = None,
    only: list[str] | None = None,
    world: str = "default",
) -> dict:
    from opd_fast.toy import toy_assets
    from opd_fast.toy.spec import world_spec

    spec_of_world = world_spec(world)  # validates the name before anything runs
    names = [spec.name for spec in RUNS]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:  # before the toy world loads
        raise ValueError(f"repro: unknown run {', '.join(unknown)}; the runs: {', '.join(names)}")
    specs = [spec for spec in RUNS if only is None or spec.name in only]
    started = time.perf_counter()
    seeds = seeds or (QUICK_SEEDS if quick else SEEDS)
    os.makedirs(out_dir, exist_ok=True)
    assets = toy_assets(spec=spec_of_world, progress=True)
    results: dict[str, list[dict]] = {}
    total = len(specs) * seeds
    for index, (spec, seed) in enumerate((s, seed) for s in specs for seed in range(seeds)):
        print(f"[{index + 1}/{total}] {spec.name} seed {seed}", flush=True)
        results.setdefault(spec.name, []).append(_run(assets, spec, seed, out_dir, quick))
    wall = time.perf_counter() - started
    with open(os.path.join(out_dir, "repro.json"), "w") as handle:
        json.dump(
            {
                "seeds": seeds,
                "quick": quick,
                "world_name": world,
                "wall_seconds": wall,
                "world": {key: assets.world.get(key) for key in ("key", "format_version", "spec")},
                "results": results,
            },
            handle,
            indent=2,
        )
    text = write_report(results, out_dir, seeds, wall, assets.world, world)
    plot_repro(results, os.path.join(out_dir, "repro.png"))
    print(text)
    return results
