"""Stage 3 of a training step: clip the accumulated gradient, AdamW's step, the learning-rate
schedule's."""

from __future__ import annotations

import math
from dataclasses import dataclass

from opd_fast.training.distributed import clip_grad_norm
from opd_fast.training.step.score import TrainingDiverged


@dataclass(frozen=True)
class Update:
    grad_norm: float  # before clipping
    lr: float  # the learning rate the step used


def apply_update(run, step: int) -> Update:
    """One optimizer step on the gradient scoring left; TrainingDiverged (nothing applied)
    when the gradient is not finite. `step`: the step being trained (for messages)."""
    grad_norm = clip_grad_norm(run.student.parameters(), run.config.grad_clip)
    if not math.isfinite(grad_norm):
        raise TrainingDiverged(f"gradient norm is {grad_norm} at step {step}")
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    return Update(grad_norm, lr)
