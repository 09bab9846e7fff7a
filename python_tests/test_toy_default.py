"""The embedded default itself, end to end: `opd-fast demo` meets its targets and
`opd-fast repro --quick` runs the whole grid. The toy world is built once per session into a
temporary cache (never the user's), exactly as a first run on a fresh machine builds it."""

from __future__ import annotations

import json
import os

import pytest

from opd_fast.cli import main


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("toy_cache"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OPD_FAST_CACHE", cache)
        yield cache


def test_demo_recovers_the_gap_and_overlap_rises(toy_cache, tmp_path, capsys):
    run_dir = tmp_path / "demo"
    assert main(["demo", "--set", f"run_dir={run_dir}", "--set", "progress=false"]) == 0
    printed = capsys.readouterr().out
    assert "gap recovery" in printed and "overlap_ratio first -> last" in printed
    summary = json.loads((run_dir / "summary.json").read_text())
    # The targets: at least half the gap recovered, overlap ratio rising.
    assert summary["teacher_acc"] > summary["student_acc_before"]
    assert summary["gap_recovery"] >= 0.5
    assert summary["overlap_ratio_last"] > summary["overlap_ratio_first"]
    for name in ("metrics.jsonl", "dynamics.png"):
        assert (run_dir / name).is_file()


def test_repro_quick_runs_the_whole_grid(toy_cache, tmp_path):
    from opd_fast.paper.repro import FINDINGS, RUNS

    out = tmp_path / "repro"
    assert main(["repro", "--quick", "--out", str(out)]) == 0
    report = (out / "repro.md").read_text()
    for spec in RUNS:
        assert f"| {spec.name} |" in report
    for key, finding, *_ in FINDINGS:
        assert f"| ({key}) | {finding} |" in report
    assert (out / "repro.png").is_file()
    results = json.loads((out / "repro.json").read_text())["results"]
    assert set(results) == {spec.name for spec in RUNS}
    assert "## Losses" in report and "Highest mean gap recovery" in report
    for rows in results.values():  # every run's cost per step
        assert rows[0]["step_seconds_median"] > 0 and rows[0]["score_seconds_median"] > 0
    # Structural facts of the world, which OPD does not decide: the other-pattern teacher starts
    # far from the student's top-k sets, and the cold start (SFT on its outputs) moves the
    # student toward them before OPD begins.
    first = {name: rows[0]["overlap_ratio_first"] for name, rows in results.items()}
    assert first["teacher"] > first["other_pattern"] + 0.2
    assert first["other_pattern_cold_start"] > first["other_pattern"] + 0.2
    assert os.path.isdir(toy_cache)
