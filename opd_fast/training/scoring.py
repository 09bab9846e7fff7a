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
    loss_path: str = LOGITS,
) -> ScoredBatch:
    """The loss (reduced by `reduction`) and metrics of `batch`.

    loss_fn: a function with opd_fast.opd_loss's signature (tests swap in the reference).
    loss_path: FUSED_LINEAR or LOGITS, as choose_loss_path decided.
    """
    if loss_path == FUSED_LINEAR:
        return _score_fused_linear(student, teacher, batch, settings, reduction)
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


def _score_fused_linear(student, teacher, batch, settings, reduction) -> ScoredBatch:
    """score_batch from hidden states: the student's and the teacher's (B, L-1, H)."""
    hidden = last_hidden_states(student, batch.input_ids, batch.attention_mask, batch.position_ids)[
        :, :-1
    ]
    weight, bias = output_layer(student)
    mask = batch.response_mask[:, 1:]
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
        sampled_ids=batch.input_ids[:, 1:],
        reduction=reduction,
        return_token_metrics=True,
        **settings.op_settings(),
    )
    return ScoredBatch(output, mask, teacher_seconds)
