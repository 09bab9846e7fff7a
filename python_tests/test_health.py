"""The live OPD health check: the paper's failure signature against a window of a run's
dynamics (the toy world's repro curves: the working pair stays healthy, the mismatched pair
and the same-pipeline teacher fail), its records and warning in a run, health_stop with a
resumable checkpoint, and the probe before training, which leaves the run's samples alone."""

from __future__ import annotations

import json
import os

import pytest

from opd_fast.toy.tiny import tiny_setup
from opd_fast.training import health
from opd_fast.training.config import make_config
from opd_fast.training.trainer import Trainer

REPRO = os.path.join(os.path.dirname(__file__), "..", "docs", "repro-2026-11-28", "repro.json")


def _records(overlap, advantage, entropy_gap):
    return [
        {"step": i + 1, "overlap_ratio": o, "overlap_token_advantage": a, "entropy_gap": e}
        for i, (o, a, e) in enumerate(zip(overlap, advantage, entropy_gap))
    ]


def _ramp(first, last, count=10):
    return [first + (last - first) * i / (count - 1) for i in range(count)]


def test_signature_on_typical_dynamics():
    healthy = _records(_ramp(0.76, 0.79), _ramp(-0.035, -0.02), _ramp(0.10, 0.45))
    assert health.check(healthy, 10, 10)["verdict"] == "healthy"  # gap widening alone is fine
    mismatched = _records(_ramp(0.33, 0.36), _ramp(-0.19, -0.17), _ramp(0.45, 0.50))
    record = health.check(mismatched, 10, 10)
    assert record["verdict"] == "failing"
    assert record["signals"]["overlap_ratio"]["bad"] and record["signals"]["entropy_gap"]["bad"]
    message = health.warning(record)
    assert "overlap ratio 0.35 < 0.50" in message and "cold_start_steps" in message
    stagnant = _records([0.68] * 10, [-0.05] * 10, [0.2] * 10)
    assert health.check(stagnant, 10, 10)["verdict"] == "failing"
    assert health.check(healthy[:5], 5, 10) is None  # not a whole window yet


def test_a_converged_wobble_is_not_a_fall_but_a_real_fall_is():
    """At a high overlap, the working pair's 1-2 point wobble over a window is healthy; a
    fall of more than OVERLAP_FALL with a flat entropy gap fails."""
    wobble = _records(_ramp(0.83, 0.814), _ramp(-0.01, -0.01), [0.07] * 10)
    assert health.check(wobble, 10, 10)["verdict"] == "healthy"
    fall = _records(_ramp(0.85, 0.81), _ramp(-0.01, -0.01), [0.07] * 10)
    record = health.check(fall, 10, 10)
    assert record["verdict"] == "failing" and "falling" in health.warning(record)


def test_the_repro_runs():
    """On the toy world's repro curves (3 seeds each): the demo's pair never fails at the
    first third's checks; the mismatched pair fails at the first one."""
    with open(REPRO) as handle:
        results = json.load(handle)["results"]
    for run in results["teacher"]:
        curve = [value for _, value in run["overlap_curve"]]
        # the window mean of the working pair's overlap never drops below the cut-off
        assert min(sum(curve[i : i + 10]) / 10 for i in range(0, 66)) >= health.COMPATIBLE_OVERLAP
    for run in results["other_pattern"]:
        curve = [value for _, value in run["overlap_curve"]][:10]
        assert sum(curve) / 10 < health.WEAK_OVERLAP


RUN = dict(
    steps=6,
    prompts_per_step=4,
    rollouts_per_prompt=2,
    max_new_tokens=8,
    micro_batch_size=3,
    teacher_batch_size=5,
    eval_every=0,
    checkpoint_every=0,
    lr=1e-2,
    progress=False,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("tiny")))


def _log(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def test_a_run_writes_health_records(tmp_path, tiny):
    """Every window, the check of the run's own last records goes into metrics.jsonl."""
    run_dir = str(tmp_path / "run")
    summary = Trainer(make_config(dict(**tiny, **RUN, run_dir=run_dir, health_window=3))).run()
    log = _log(run_dir)
    checks = [r for r in log if r["kind"] == "health"]
    assert [r["step"] for r in checks] == [3, 6]
    train = [r for r in log if r["kind"] == "train"]
    for record in checks:
        assert record == json.loads(json.dumps(health.check(train, record["step"], 3)))
    assert summary["health_verdict"] == checks[-1]["verdict"]


def _failing_from(step):
    real = health.check

    def check(train, at, window):
        record = real(train, at, window)
        if record is not None and at >= step:
            record["verdict"] = "failing"
            record["signals"]["overlap_ratio"].update(bad=True, reason="0.30 < 0.50")
        return record

    return check


def test_a_failing_check_warns(tmp_path, tiny, capsys, monkeypatch):
    monkeypatch.setattr(health, "check", _failing_from(3))
    Trainer(make_config(dict(**tiny, **RUN, run_dir=str(tmp_path), health_window=3))).run()
    out = capsys.readouterr().out
    assert "OPD health at step 3" in out and "overlap ratio 0.30 < 0.50" in out


def test_health_stop_stops_with_a_checkpoint_and_resumes(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(health, "check", _failing_from(3))
    run_dir = str(tmp_path / "run")
    values = dict(**tiny, **RUN, run_dir=run_dir, health_window=3, health_stop=True)
    stopped = Trainer(make_config(values)).run()
    assert stopped["stopped_at_step"] == 3 and stopped["health"]["verdict"] == "failing"
    assert os.path.isdir(stopped["checkpoint"])
    values["health_stop"] = False
    monkeypatch.undo()
    Trainer(make_config(values)).run(resume=True)
    assert [r["step"] for r in _log(run_dir) if r["kind"] == "train"] == list(range(1, 7))


def test_probe_before_train_leaves_the_run_alone(tmp_path, tiny, capsys):
    plain = str(tmp_path / "plain")
    probed = str(tmp_path / "probed")
    Trainer(make_config(dict(**tiny, **RUN, run_dir=plain))).run()
    Trainer(make_config(dict(**tiny, **RUN, run_dir=probed, probe_before_train=True))).run()
    assert "probe before training: overlap ratio" in capsys.readouterr().out
    probes = [r for r in _log(probed) if r["kind"] == "probe"]
    assert len(probes) == 1
    assert probes[0]["verdict"] == health.verdict(probes[0]["overlap_ratio"])
    timing = ("seconds", "per_s", "memory")

    def train(run_dir):
        return [
            {k: v for k, v in r.items() if not any(t in k for t in timing)}
            for r in _log(run_dir)
            if r["kind"] == "train"
        ]

    assert train(probed) == train(plain)
