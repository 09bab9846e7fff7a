"""Stage 4 of a training step: the rollout engine gets the updated weights, so the next
rollouts sample the student as it is now (a no-op for the `hf` engine, which samples the live
model; vLLM copies them in place)."""

from __future__ import annotations


def sync_weights(run) -> None:
    run.engine.sync_weights(run.student)
