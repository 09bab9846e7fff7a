"""Asynchronous OPD (max_staleness): rollouts sampled by a thread beside the trainer, exactly
that many updates behind, on an own copy of the student. Runs are reproducible whatever the
threads' timing, the staleness never exceeds the bound, the off-policy gap of the stale
rollouts is logged, a resume mid-queue reproduces the uninterrupted run, 0 is the
synchronous loop, and a failing sampler ends the run with its error instead of a hang."""

from __future__ import annotations

import json
import os

import pytest

from opd_fast.toy.tiny import tiny_setup
from opd_fast.training.config import make_config
from opd_fast.training.step import rollout as rollout_stage
from opd_fast.training.trainer import Trainer

RUN = dict(
    steps=5,
    prompts_per_step=4,
    rollouts_per_prompt=2,
    max_new_tokens=8,
    micro_batch_size=3,
    teacher_batch_size=5,
    eval_every=2,
    checkpoint_every=1,
    lr=1e-2,
    progress=False,
)
TIMING = ("seconds", "per_s", "memory")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("tiny")))


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        rows = [json.loads(line) for line in handle]
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows]


def run(tiny, run_dir, **keys):
    Trainer(make_config(dict(**tiny, **RUN, run_dir=str(run_dir), **keys))).run()
    return records(run_dir)


@pytest.mark.parametrize("staleness", [1, 2])
def test_runs_are_reproducible_and_the_staleness_bounded(tmp_path, tiny, staleness):
    first = run(tiny, tmp_path / "a", max_staleness=staleness)
    assert run(tiny, tmp_path / "b", max_staleness=staleness) == first
    train = [r for r in first if r["kind"] == "train"]
    assert [r["rollout_staleness"] for r in train] == [min(s - 1, staleness) for s in range(1, 6)]
    # The engine samples a copy that is `staleness` updates behind: the gap is no longer
    # rounding once the student has moved.
    assert train[-1]["rollout_logprob_gap_mean"] > 1e-4
    assert train[0]["rollout_logprob_gap_mean"] < 1e-4  # step 1: the same weights


def test_resume_mid_queue_reproduces_the_uninterrupted_run(tmp_path, tiny):
    full = run(tiny, tmp_path / "full", max_staleness=2)
    config = make_config(dict(**tiny, **RUN, run_dir=str(tmp_path / "resumed"), max_staleness=2))
    assert Trainer(config).run(stop_after=2)["stopped_at_step"] == 2
    Trainer(config).run(resume=True)
    assert records(tmp_path / "resumed") == full


def test_zero_is_the_synchronous_loop(tmp_path, tiny):
    synchronous = run(tiny, tmp_path / "zero", max_staleness=0)
    assert synchronous == run(tiny, tmp_path / "default")
    assert all("rollout_staleness" not in r for r in synchronous)


def test_a_failing_sampler_ends_the_run_with_its_error(tmp_path, tiny, monkeypatch):
    real = rollout_stage.sample_rollouts
    calls = []

    def failing(run_parts):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("the engine broke")
        return real(run_parts)

    monkeypatch.setattr(rollout_stage, "sample_rollouts", failing)
    trainer = Trainer(make_config(dict(**tiny, **RUN, run_dir=str(tmp_path), max_staleness=1)))
    with pytest.raises(RuntimeError, match="the rollout thread failed: the engine broke"):
        trainer.run()
    assert trainer.ahead is None  # the thread was stopped
