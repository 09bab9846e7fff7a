"""One OPD training step, in five named stages, each timed by one helper (`timing`):

    rollout   the step's prompts answered by the student's rollout engine      `rollout`
    score     every micro-batch scored by the teacher, the loss and its        `score`
              backward (where rollouts, the teacher and the loss meet)
    update    the gradient clipped, AdamW's step, the learning-rate schedule   `update`
    sync      the updated weights into the rollout engine                      `sync`
    record    the step's metrics over ranks, written to metrics.jsonl          `record`

`train_step` runs them in that order on a built run (opd_fast.training.builder).
"""

from __future__ import annotations

from opd_fast.training.data import Example
from opd_fast.training.rollouts import RolloutBatch
from opd_fast.training.step.record import record_step
from opd_fast.training.step.rollout import sample_rollouts
from opd_fast.training.step.score import TrainingDiverged, score_and_backward
from opd_fast.training.step.sync import sync_weights
from opd_fast.training.step.timing import StageTimer
from opd_fast.training.step.update import apply_update

__all__ = ["TrainingDiverged", "train_step"]


def train_step(
    run,
    step: int,
    rollouts: tuple[RolloutBatch, list[Example]] | None = None,
    *,
    staleness: int | None = None,
    sync=None,
) -> dict:
    """Train step number `step` (1-based) and return its record. rollouts: this rank's
    (batch, examples) to train on instead of sampling them (sampled ahead, or a test's);
    staleness: how many updates older than the student the weights that sampled them are
    (logged when given); sync: what stage 4 calls instead of syncing the engine itself."""
    timer = StageTimer()
    run.memory.start()
    with timer.stage("rollout"):
        rollouts = rollouts if rollouts is not None else sample_rollouts(run)
    rollout_peak_mib = run.memory.peak_mib()
    run.memory.start()
    with timer.stage("score"):
        scored = score_and_backward(run, rollouts[0], step, rollouts[1])
    timer.add("teacher", scored.teacher_seconds)
    with timer.stage("update"):
        update = apply_update(run, step)
    with timer.stage("sync"):
        sync() if sync is not None else sync_weights(run)
    return record_step(run, step, rollouts, scored, update, timer, rollout_peak_mib, staleness)
