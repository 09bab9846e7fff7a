"""Where rollouts, the teacher and the loss meet: a batch of rollouts scored.

Position t predicts token t + 1, so the loss reads positions 0 .. L-2 where the next token is
a response token, over the columns both models share. The student side comes in one of two
forms, chosen by the loss path, and both give the same loss, metrics and gradients:

- `fused_linear` (the default): the student's forward stops at its final hidden states
  (`StudentHidden`), and opd_fast.linear_opd_loss forms its logits a chunk of tokens at a time,
  so no (B, L, V) tensor (nor its gradient) ever exists;
- `logits`: the student's forward gives logits at every position (`StudentLogits`), and the
  fused op opd_fast.opd_loss turns them into the loss.

The teacher is asked once (`Teacher.score`), in the form the loss path prefers; whatever it
answers (logits, a LinearTeacher, a payload for the student's top-k ids) goes to the loss as
it is. Training calls this under autograd (`score_and_backward`, stage 2 of the step), the
diagnostics without (`score_batch`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from opd_fast.models.batch import packed_attention
from opd_fast.models.output_layer import (
    last_hidden_states,
    nonlinear_head_reason,
    output_layer,
    with_root_parameters,
)
from opd_fast.op.kernels import row_topk
from opd_fast.op.linear import linear_opd_loss, linear_topk_ids
from opd_fast.op.loss import NonFiniteLogitsError, OPDLossOutput, opd_loss
from opd_fast.op.reductions import SplitReduction
from opd_fast.teachers.base import HIDDEN_STATES, LOGITS, ScoreRequest, Teacher
from opd_fast.training.data import Example
from opd_fast.training.metrics import PositionProfile, StepMetrics
from opd_fast.training.off_policy import (
    OffPolicyGap,
    sampled_log_probs,
    sampled_log_probs_from_hidden,
    truncated_is_weights,
)
from opd_fast.training.rollouts.batch import RolloutBatch
from opd_fast.training.step.micro_batches import routed_micro_batches

FUSED_LINEAR = "fused_linear"
LOSS_PATHS = (FUSED_LINEAR, LOGITS)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN/inf; the last good checkpoint is kept."""


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


def fused_linear_unavailable(student: torch.nn.Module, loss_fn) -> str | None:
    """Why the fused_linear path cannot score with this student (None: it can), on any number
    of ranks. Every teacher can: one whose logits are not a linear layer of its hidden states
    answers with logits, a payload teacher with its payload, and linear_opd_loss takes both."""
    if loss_fn is not opd_loss:
        return "a custom loss_fn is given (it takes logits)"
    reason = nonlinear_head_reason(student)
    if reason is not None:
        return f"the student's logits are not a linear layer of its hidden states: {reason}"
    return None


def choose_loss_path(wanted: str, student, loss_fn=opd_loss) -> tuple[str, str]:
    """(the path score_batch will take, why) for the config's `loss_path`."""
    if wanted not in LOSS_PATHS:
        raise ValueError(f"loss_path must be one of {LOSS_PATHS}, got {wanted!r}")
    if wanted == LOGITS:
        return LOGITS, "loss_path=logits"
    reason = fused_linear_unavailable(student, loss_fn)
    if reason is None:
        return FUSED_LINEAR, "loss_path=fused_linear"
    return LOGITS, f"loss_path=fused_linear is not possible here, {reason}: using logits"


# ---- the student's side, in the loss path's form --------------------------------------------


class StudentLogits:
    """The student's (B, L-1, vocab) logits at the scored positions (the logits path)."""

    answer_form = LOGITS

    def __init__(self, student, batch: RolloutBatch, vocab: int, loss_fn=opd_loss):
        logits = student(
            input_ids=batch.input_ids,
            attention_mask=packed_attention(student, batch.attention_mask, batch.segment_ids),
            position_ids=batch.position_ids,
            use_cache=False,
        ).logits
        # Position t predicts token t + 1; drop padded vocabulary columns past the shared part.
        self.rows = logits[:, :-1, :vocab]
        self.dtype = self.rows.dtype
        self.loss_fn = loss_fn

    @torch.no_grad()
    def topk_ids(self, k: int) -> torch.Tensor:
        """(B, L-1, k) int64: the top-k ids (ties -> lower id) at every position, a sequence
        at a time (the rows are a strided view: flattening them would copy the logits)."""
        return torch.stack([row_topk(rows, k).ids for rows in self.rows.unbind(0)])

    def sampled_log_probs(self, sampled_ids, temperature) -> torch.Tensor:
        return sampled_log_probs(self.rows, sampled_ids, temperature)

    def loss(self, teacher_answer, **op_keywords) -> OPDLossOutput:
        return self.loss_fn(self.rows, teacher_answer, **op_keywords)


class StudentHidden:
    """The student's (B, L-1, H) final hidden states and output layer (the fused_linear path):
    its logits are formed a chunk of tokens at a time, inside the loss. Everything that reads
    the student's weights runs through with_root_parameters, so that under FSDP2 the output
    layer is gathered (and its gradient reduce-scattered) by FSDP's own hooks."""

    answer_form = HIDDEN_STATES

    def __init__(self, student, batch: RolloutBatch, vocab: int):
        self.student, self.vocab = student, vocab
        attention = packed_attention(student, batch.attention_mask, batch.segment_ids)
        self.hidden = with_root_parameters(
            student,
            lambda model: last_hidden_states(model, batch.input_ids, attention, batch.position_ids)[
                :, :-1
            ],
        )
        self.dtype = self.hidden.dtype

    def _with_output_layer(self, fn):
        return with_root_parameters(self.student, lambda model: fn(*output_layer(model)))

    def topk_ids(self, k: int) -> torch.Tensor:
        return self._with_output_layer(
            lambda weight, bias: linear_topk_ids(self.hidden, weight, bias, self.vocab, k)
        )

    def sampled_log_probs(self, sampled_ids, temperature) -> torch.Tensor:
        return self._with_output_layer(
            lambda weight, bias: sampled_log_probs_from_hidden(
                self.hidden, weight, bias, self.vocab, sampled_ids, temperature
            )
        )

    def loss(self, teacher_answer, **op_keywords) -> OPDLossOutput:
        return self._with_output_layer(
            lambda weight, bias: linear_opd_loss(
                self.hidden,
                weight,
                teacher_answer,
                student_bias=bias,
                vocab=self.vocab,
                **op_keywords,
            )
        )


# ---- one batch ------------------------------------------------------------------------------


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
    loss_path: str = LOGITS,
) -> ScoredBatch:
    """The loss (reduced by `reduction`) and metrics of `batch`.

    loss_fn: a function with opd_fast.opd_loss's signature (tests swap in the reference; the
    logits path only). rollout_temperature: also return the trainer's log-prob of each sampled
    token at this temperature (when the batch has the engine's). is_cap: weight each token's
    loss by min(pi_train / pi_engine, is_cap) (truncated importance sampling, as token
    weights of the loss). loss_path: FUSED_LINEAR or LOGITS, as choose_loss_path decided.
    """
    if loss_path == FUSED_LINEAR:
        student_side = StudentHidden(student, batch, settings.vocab)
    else:
        student_side = StudentLogits(student, batch, settings.vocab, loss_fn)
    mask = batch.response_mask[:, 1:]
    sampled_ids = batch.input_ids[:, 1:]
    train_log_probs, is_weights = _off_policy(
        batch, rollout_temperature, is_cap, student_side, sampled_ids
    )
    started = time.perf_counter()
    teacher_answer = teacher.score(
        ScoreRequest(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            response_mask=mask,
            k=settings.k,
            temperature=settings.temperature,
            vocab=settings.vocab,
            dtype=student_side.dtype,
            answer_form=student_side.answer_form,
            segment_ids=batch.segment_ids,
            student_topk_ids=student_side.topk_ids(settings.k)
            if teacher.needs_student_topk
            else None,
        )
    )
    teacher_seconds = time.perf_counter() - started
    output = student_side.loss(
        teacher_answer,
        mask=mask,
        sampled_ids=sampled_ids,
        reduction=reduction,
        token_weights=is_weights,
        return_token_metrics=True,
        **settings.op_settings(),
    )
    return ScoredBatch(output, mask, teacher_seconds, train_log_probs, is_weights)


def _off_policy(batch, rollout_temperature, is_cap, student_side, sampled_ids):
    """(the trainer's log-probs of the sampled tokens at the rollout temperature, the
    truncated IS weights): both None when the batch has no engine log-probs to compare."""
    if rollout_temperature is not None and batch.engine_log_probs is not None:
        train_log_probs = student_side.sampled_log_probs(sampled_ids, rollout_temperature)
        if not is_cap:
            return train_log_probs, None
        engine_log_probs = batch.engine_log_probs[:, 1:]
        return train_log_probs, truncated_is_weights(train_log_probs, engine_log_probs, is_cap)
    if is_cap:
        raise ValueError("is_cap needs rollout_temperature and the engine's log-probs")
    return None, None


# ---- stage 2 of a training step -------------------------------------------------------------


@dataclass
class ScoredStep:
    """What scoring a step's rollouts gave: the gradient is in the student's parameters."""

    loss: float  # the step's loss (the global batch's reduction, this rank's share)
    metrics: StepMetrics
    profile: PositionProfile
    gap: OffPolicyGap
    teacher_seconds: float = 0.0
    computed_tokens: int = 0  # token positions the micro-batches' forwards computed
    by_teacher: dict[str, StepMetrics] = field(default_factory=dict)  # several teachers


def score_and_backward(
    run, batch: RolloutBatch, step: int, examples: list[Example] | None = None
) -> ScoredStep:
    """Score the step's rollouts a micro-batch at a time and accumulate the gradient of the
    step's loss, normalised over the global batch (every micro-batch of every rank), so
    that all ranks together make the single-process update. `step`: the step being trained
    (for messages); examples: each sequence's, which route it to its teacher when the run
    has several (each micro-batch then holds one teacher's sequences)."""
    config, dist = run.config, run.dist
    run.student.train()
    run.optimizer.zero_grad(set_to_none=True)
    sequences = batch.input_ids.shape[0]
    tokens, total_sequences = dist.sum([int(batch.response_mask[:, 1:].sum()), sequences])
    split = SplitReduction(config.reduction, tokens, total_sequences)
    scored = ScoredStep(
        0.0, StepMetrics(), PositionProfile(span=config.max_new_tokens), OffPolicyGap()
    )
    is_cap = config.rollout_is_cap or None
    groups = None
    if run.routes is not None:
        groups = run.routes.groups(examples)
        scored.by_teacher = {name: StepMetrics() for name in groups}
    for name, micro in routed_micro_batches(batch, config, dist, groups):
        scored.computed_tokens += micro.computed_tokens
        try:
            part = score_batch(
                run.student,
                run.teacher_of(name),
                micro,
                run.loss,
                reduction=split.part_reduction,
                loss_fn=run.loss_fn,
                rollout_temperature=config.rollout_temperature,
                is_cap=is_cap,
                loss_path=run.loss_path,
            )
        except NonFiniteLogitsError as error:
            raise TrainingDiverged(f"non-finite logits at step {step}: {error}") from None
        scored.teacher_seconds += part.teacher_seconds
        if part.train_log_probs is not None:
            scored.gap.add(
                part.train_log_probs,
                micro.engine_log_probs[:, 1:],
                part.response_mask,
                part.is_weights,
                is_cap,
            )
        scaled = split.scale(part.output.loss)
        if not torch.isfinite(scaled):
            raise TrainingDiverged(f"loss is {float(scaled)} at step {step}")
        dist.backward(scaled)
        scored.loss += float(scaled.detach())
        scored.metrics.add(part.output.metrics)
        if name is not None:
            scored.by_teacher[name].add(part.output.metrics)
        offsets = None if micro.segment_ids is None else micro.response_offsets()
        scored.profile.add(part.output.token_metrics, micro.response_mask[:, 1:], offsets)
    return scored
