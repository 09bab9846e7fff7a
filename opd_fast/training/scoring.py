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
from opd_fast.training.off_policy import reduce_weighted, sampled_log_probs, truncated_is_weights
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
    # (B, L-1) the trainer's log-prob of each next token at the rollout temperature, when
    # the batch carries the engine's (the off-policy gap); the IS weights when they applied.
    train_log_probs: torch.Tensor | None = None
    is_weights: torch.Tensor | None = None


def score_batch(
    student: torch.nn.Module,
    teacher: Teacher,
    batch: RolloutBatch,
    settings: LossSettings,
    *,
    reduction: str = "sum",
    loss_fn=opd_loss,
    rollout_temperature: float | None = None,
    is_cap: float | None = None,
) -> ScoredBatch:
    """The loss (reduced by `reduction`) and metrics of `batch`.

    loss_fn: a function with opd_fast.opd_loss's signature (tests swap in the reference).
    rollout_temperature: also return the trainer's log-prob of each sampled token at this
    temperature (when the batch has the engine's). is_cap: weight each token's loss by
    min(pi_train / pi_engine, is_cap) (truncated importance sampling; reduction sum or
    seq_mean_token_sum).
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
    sampled_ids = batch.input_ids[:, 1:]
    train_log_probs = is_weights = None
    if rollout_temperature is not None and batch.engine_log_probs is not None:
        train_log_probs = sampled_log_probs(student_rows, sampled_ids, rollout_temperature)
        if is_cap:
            is_weights = truncated_is_weights(
                train_log_probs, batch.engine_log_probs[:, 1:], is_cap
            )
    elif is_cap:
        raise ValueError("is_cap needs rollout_temperature and the engine's log-probs")
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
        sampled_ids=sampled_ids,
        reduction="none" if is_weights is not None else reduction,
        return_token_metrics=True,
        **settings.op_settings(),
    )
    if is_weights is not None:
        output.loss = reduce_weighted(output.loss, is_weights, mask, reduction)
    return ScoredBatch(output, mask, teacher_seconds, train_log_probs, is_weights)
