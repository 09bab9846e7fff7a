"""Where rollouts, the teacher and the loss meet: one micro-batch of rollouts scored.

Position t predicts token t + 1, so the loss reads positions 0 .. L-2 where the next token is
a response token, over the columns both models share. Two loss paths give the same loss,
metrics and gradients:

- `fused_linear` (the default): the student's forward stops at its final hidden states, an
  in-process teacher returns its own hidden states with its output layer, and
  opd_fast.linear_opd_loss forms both models' logits a chunk of tokens at a time, so no
  (B, L, V) tensor (nor its gradient) ever exists;
- `logits`: the student's forward gives logits at every position, the teacher answers with
  logits or a payload, and the fused op turns both into the loss. A payload teacher (a
  server, an OpenAI-compatible engine) always takes this path: it is asked about the
  student's top-k ids, read from the logits.

Training calls this under autograd, the diagnostics without.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from opd_fast.models.output_layer import last_hidden_states, nonlinear_head_reason, output_layer
from opd_fast.op.linear import linear_opd_loss
from opd_fast.op.loss import OPDLossOutput, opd_loss
from opd_fast.teachers.base import ScoreRequest, Teacher
from opd_fast.training.off_policy import (
    reduce_weighted,
    sampled_log_probs,
    sampled_log_probs_from_hidden,
    truncated_is_weights,
)
from opd_fast.training.rollout import RolloutBatch

FUSED_LINEAR, LOGITS = "fused_linear", "logits"
LOSS_PATHS = (FUSED_LINEAR, LOGITS)


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


def fused_linear_unavailable(student: torch.nn.Module, teacher: Teacher, loss_fn) -> str | None:
    """Why the fused_linear path cannot score with this student and teacher (None: it can)."""
    if loss_fn is not opd_loss:
        return "a custom loss_fn is given (it takes logits)"
    if not hasattr(teacher, "linear_teacher"):
        return f"{type(teacher).__name__} answers with {teacher.returns}, not hidden states"
    for name, reason in (
        ("student", nonlinear_head_reason(student)),
        ("teacher", teacher.linear_head_reason),
    ):
        if reason is not None:
            return f"the {name}'s logits are not a linear layer of its hidden states: {reason}"
    return None


def choose_loss_path(wanted: str, student, teacher: Teacher, loss_fn=opd_loss) -> tuple[str, str]:
    """(the path score_batch will take, why) for the config's `loss_path`."""
    if wanted not in LOSS_PATHS:
        raise ValueError(f"loss_path must be one of {LOSS_PATHS}, got {wanted!r}")
    if wanted == LOGITS:
        return LOGITS, "loss_path=logits"
    reason = fused_linear_unavailable(student, teacher, loss_fn)
    if reason is None:
        return FUSED_LINEAR, "loss_path=fused_linear"
    return LOGITS, f"loss_path=fused_linear is not possible here, {reason}: using logits"


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
    loss_path: str = LOGITS,
) -> ScoredBatch:
    """The loss (reduced by `reduction`) and metrics of `batch`.

    loss_fn: a function with opd_fast.opd_loss's signature (tests swap in the reference).
    rollout_temperature: also return the trainer's log-prob of each sampled token at this
    temperature (when the batch has the engine's). is_cap: weight each token's loss by
    min(pi_train / pi_engine, is_cap) (truncated importance sampling; reduction sum or
    seq_mean_token_sum).
    loss_path: FUSED_LINEAR or LOGITS, as choose_loss_path decided.
    """
    if loss_path == FUSED_LINEAR:
        return _score_fused_linear(
            student, teacher, batch, settings, reduction, rollout_temperature, is_cap
        )
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
    train_log_probs, is_weights = _off_policy(
        batch,
        rollout_temperature,
        is_cap,
        lambda temperature: sampled_log_probs(student_rows, sampled_ids, temperature),
    )
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


def _score_fused_linear(
    student, teacher, batch, settings, reduction, rollout_temperature, is_cap
) -> ScoredBatch:
    """score_batch from hidden states: the student's and the teacher's (B, L-1, H)."""
    hidden = last_hidden_states(student, batch.input_ids, batch.attention_mask, batch.position_ids)[
        :, :-1
    ]
    weight, bias = output_layer(student)
    mask = batch.response_mask[:, 1:]
    sampled_ids = batch.input_ids[:, 1:]
    train_log_probs, is_weights = _off_policy(
        batch,
        rollout_temperature,
        is_cap,
        lambda temperature: sampled_log_probs_from_hidden(
            hidden, weight, bias, settings.vocab, sampled_ids, temperature
        ),
    )
    started = time.perf_counter()
    teacher_rows = teacher.linear_teacher(
        batch.input_ids, batch.attention_mask, batch.position_ids, hidden.dtype
    )
    teacher_seconds = time.perf_counter() - started
    output = linear_opd_loss(
        hidden,
        weight,
        teacher_rows,
        student_bias=bias,
        vocab=settings.vocab,
        mask=mask,
        sampled_ids=sampled_ids,
        reduction="none" if is_weights is not None else reduction,
        return_token_metrics=True,
        **settings.op_settings(),
    )
    if is_weights is not None:
        output.loss = reduce_weighted(output.loss, is_weights, mask, reduction)
    return ScoredBatch(output, mask, teacher_seconds, train_log_probs, is_weights)


def _off_policy(batch, rollout_temperature, is_cap, train_log_probs_at):
    """(the trainer's log-probs of the sampled tokens at the rollout temperature, the
    truncated IS weights): both None when the batch has no engine log-probs to compare."""
    if rollout_temperature is not None and batch.engine_log_probs is not None:
        train_log_probs = train_log_probs_at(rollout_temperature)
        if not is_cap:
            return train_log_probs, None
        engine_log_probs = batch.engine_log_probs[:, 1:]
        return train_log_probs, truncated_is_weights(train_log_probs, engine_log_probs, is_cap)
    if is_cap:
        raise ValueError("is_cap needs rollout_temperature and the engine's log-probs")
    return None, None
