"""Where rollouts, the teacher and the loss meet: one micro-batch of rollouts scored.

The student's forward gives logits at every position; position t predicts token t + 1, so
the loss reads positions 0 .. L-2 where the next token is a response token, over the columns
both models share. The teacher answers for the same positions (logits or a payload), and the
fused op turns both into the loss and every metric. Training calls this under autograd,
the diagnostics without.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from opd_fast.op.loss import OPDLossOutput, opd_loss
from opd_fast.teachers.base import ScoreRequest, Teacher
from opd_fast.training.rollout import RolloutBatch


@dataclass(frozen=True)
class LossSettings:
    """The loss's settings and the shared vocabulary it runs over."""

    k: int
    variant: str
    estimator: str
    temperature: float
    vocab: int

    def op_settings(self) -> dict:
        """The opd_loss keywords these settings fix."""
        return {
            "k": self.k,
            "variant": self.variant,
            "estimator": self.estimator,
            "temperature": self.temperature,
        }


@dataclass
class ScoredBatch:
    output: OPDLossOutput  # with per-token metrics (B, L-1)
    response_mask: torch.Tensor  # (B, L-1): the positions the loss read
    teacher_seconds: float


def score_batch(
    student: torch.nn.Module,
    teacher: Teacher,
    batch: RolloutBatch,
    settings: LossSettings,
    *,
    reduction: str = "sum",
    loss_fn=opd_loss,
) -> ScoredBatch:
    """The loss (reduced by `reduction`) and metrics of `batch`.

    loss_fn: a function with opd_fast.opd_loss's signature (tests swap in the reference).
    """
    student_logits = student(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).logits
    # Position t predicts token t + 1; drop padded vocabulary columns past the shared part.
    student_rows = student_logits[:, :-1, : settings.vocab]
    mask = batch.response_mask[:, 1:]
    started = time.perf_counter()
    teacher_rows = teacher.score(
        ScoreRequest(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            response_mask=mask,
            student_logits=student_rows.detach(),
            k=settings.k,
            temperature=settings.temperature,
            vocab=settings.vocab,
        )
    )
    teacher_seconds = time.perf_counter() - started
    output = loss_fn(
        student_rows,
        teacher_rows,
        mask=mask,
        sampled_ids=batch.input_ids[:, 1:],
        reduction=reduction,
        return_token_metrics=True,
        **settings.op_settings(),
    )
    return ScoredBatch(output, mask, teacher_seconds)
