"""bench/bench_opd.py's bookkeeping on a tiny shape: every implementation runs and agrees on the
loss, the ratios land on the opd_fast rows under the same load, a configuration that never
starts quiet is retried a bounded number of times and marked, and the competing load is a
process pinned to one core that is gone after its block."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_opd  # noqa: E402  (bench/ is not a package)


def run_bench(tmp_path, *extra):
    out = tmp_path / "bench.json"
    argv = [
        "--n", "4", "--vocab", "256", "--dtypes", "fp32", "--modes", "fwd_bwd",
        "--impls", "opd_fast", "floor", "careful", "reference",
        "--repeats", "2", "--baseline-repeats", "2", "--slow-repeats", "2", "--warmup", "0",
        "--no-isolate", "--settle-s", "0", "--busy-window-s", "0.05", "--out", str(out), *extra,
    ]  # fmt: skip
    assert bench_opd.main(argv) == 0
    return json.loads(out.read_text())


def test_rows_ratios_and_retries(tmp_path):
    document = run_bench(tmp_path, "--quiet-load", "-1", "--load-retries", "1")
    rows = document["rows"]
    assert len(rows) == 4 and all(row["status"] == "ok" for row in rows), rows
    # a load average never reaches -1: every configuration ran twice and says so
    assert all(row["attempts"] == 2 and row["quiet_start"] is False for row in rows)
    for row in rows:
        if row["impl"] != "opd_fast":
            continue
        for base in ("careful", "reference"):
            assert row[f"speedup_vs_{base}"] > 0
            assert row[f"loss_diff_vs_{base}"] < 1e-5, (base, row)
        assert row["x_floor"] > 0
    targets = document["targets"]
    assert [t["meets_vs_careful"] is not None for t in targets] == [True]
    assert targets[0]["meets_vs_careful_compile"] is None  # not measured: no verdict
    table = bench_opd.markdown_table(document)
    assert table.count("\n") == 1 + len(rows) and "!" in table  # never-quiet rows are marked


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity")
def test_competing_load_is_pinned_and_stopped(tmp_path):
    with bench_opd.CompetingLoad(0) as load:
        process = load.process
        assert os.sched_getaffinity(process.pid) == {0}
        assert process.poll() is None
    assert process.poll() is not None
    document = run_bench(tmp_path, "--competing-load", "both", "--impls", "opd_fast", "careful")
    loaded = [row for row in document["rows"] if row["competing_load"]]
    assert len(loaded) == 2 and all(row["slowdown_under_load"] > 0 for row in loaded)
    assert all("speedup_vs_careful" in r for r in document["rows"] if r["impl"] == "opd_fast")


def test_interleaved_rows_beside_back_to_back(tmp_path):
    document = run_bench(
        tmp_path, "--impls", "opd_fast", "floor", "--interleave", "off", "eager", "alloc"
    )
    rows = document["rows"]
    assert [(row["impl"], row["interleave"]) for row in rows] == [
        (impl, kind) for impl in ("opd_fast", "floor") for kind in ("off", "eager", "alloc")
    ]
    for row in rows:
        assert row["status"] == "ok" and row["spread"] >= 1.0
        assert ("x_back_to_back" in row) == (row["interleave"] != "off")
        if row["impl"] == "opd_fast":
            assert row["x_floor"] > 0  # against the floor interleaved the same way
    targets = {t["interleave"]: t for t in document["targets"]}
    assert targets["off"]["meets_x_floor"] is not None
    # 2 calls are too few for a spread verdict; no careful_compile: no verdict
    assert targets["eager"]["meets_spread"] is False
    assert targets["eager"]["meets_vs_careful_compile"] is None
    table = bench_opd.markdown_table(document)
    assert "| eager |" in table and "x back to back" in table


def test_several_estimators_in_one_run(tmp_path):
    """--estimators exact tail: each estimator-dependent implementation runs once per
    estimator, the floor once; tail's opd_fast row gets x_exact and issue 22's verdict."""
    document = run_bench(tmp_path, "--impls", "opd_fast", "floor", "careful",
                         "--estimators", "exact", "tail")  # fmt: skip
    rows = document["rows"]
    assert [(row["impl"], row["estimator"]) for row in rows] == [
        ("opd_fast", "exact"), ("opd_fast", "tail"), ("floor", "n/a"), ("careful", "exact"),
        ("careful", "tail"),
    ]  # fmt: skip
    for row in rows:
        assert row["status"] == "ok"
        if row["impl"] == "opd_fast":
            assert row["x_floor"] > 0 and row["loss_diff_vs_careful"] < 1e-5, row
            assert ("x_exact" in row) == (row["estimator"] == "tail")
    targets = {t["estimator"]: t for t in document["targets"]}
    assert targets["tail"]["meets_tail_x_exact"] is not None
    assert "meets_tail_x_exact" not in targets["exact"]


def test_confident_logits_put_the_rows_where_tail_sums_the_rest(tmp_path):
    """--logits confident: every row's top-16 holds more than 15/16 of both models' mass (the
    threshold above which tail sums the rest of the row), and the rows say which logits."""
    import torch

    from opd_fast.op.names import TAIL_COMPLEMENT_LOG_MASS

    student, teacher, _ = bench_opd.make_inputs(8, 4096, torch.float32, torch.device("cpu"), 0,
                                                "confident")  # fmt: skip
    for logits in (student, teacher):
        top_mass = logits.softmax(-1).topk(16).values.sum(-1)
        assert bool((top_mass.log() > TAIL_COMPLEMENT_LOG_MASS).all()), top_mass
    with pytest.raises(ValueError, match="unknown logits 'sharp'"):
        bench_opd.make_inputs(2, 64, torch.float32, torch.device("cpu"), 0, "sharp")
    document = run_bench(tmp_path, "--logits", "confident", "--impls", "opd_fast",
                         "--estimators", "exact", "tail")  # fmt: skip
    assert {row["logits"] for row in document["rows"]} == {"confident"}
    assert {row["estimator"] for row in document["rows"]} == {"exact", "tail"}
