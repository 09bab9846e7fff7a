"""The one teacher interface: what every teacher (in-process model, opd-fast teacher server,
OpenAI-compatible engine, and those to come) tells and answers.

A teacher says its vocabulary (`vocab_size`, its output rows), the variants whose loss it can
score exactly (`variants`), whether it needs the student's top-k ids to answer
(`needs_student_topk`: a payload teacher is asked about them), and whether a model to sample
from is in this process (`local_model`, for evaluating its accuracy and for the cold start).
It scores a batch with one call, `score(request)`, and answers in a form the loss takes:
teacher logits, a `LinearTeacher` (hidden states and output layer, for the fused linear
loss), or a `TeacherPayload`. Callers never ask which kind of teacher they hold; they hand the
answer to the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Union, runtime_checkable

import numpy as np
import torch

from opd_fast.op.linear import LinearTeacher
from opd_fast.op.names import NEEDS_TEACHER_LOGITS, VARIANTS
from opd_fast.op.payload import TeacherPayload
from opd_fast.teachers.payload_batch import PayloadBatch

# What a teacher that has its model in process answers with, as the loss path asks.
LOGITS = "logits"  # (B, L-1, vocab) logits
HIDDEN_STATES = "hidden_states"  # a LinearTeacher: the loss forms the logits a chunk at a time
ANSWER_FORMS = (LOGITS, HIDDEN_STATES)

# What a payload can score exactly (docs/math.md, Teacher payload).
PAYLOAD_VARIANTS = tuple(v for v in VARIANTS if v not in NEEDS_TEACHER_LOGITS)

TeacherAnswer = Union[torch.Tensor, LinearTeacher, TeacherPayload]


@dataclass(frozen=True)
class ScoreRequest:
    """One batch of rollouts to score, and what the teacher needs to know about the student.

    input_ids, attention_mask, position_ids: (B, L) prompt + response, right-padded.
    response_mask: (B, L-1), True at positions t whose next token t + 1 is a response token:
      the rows the loss reads (other positions may hold any finite filler).
    k, temperature: the loss's. vocab: the columns both models share (score ids < vocab).
    dtype: the student's; logits and hidden states come back in it.
    answer_form: LOGITS or HIDDEN_STATES, what an in-process teacher answers with (the loss
      path's choice; a teacher that cannot give hidden states answers with logits, and a
      payload teacher always with a payload: the loss takes all three).
    student_topk_ids: (B, L-1, k) int64, the student's top-k ids (ties -> lower id) at every
      position; given to the teachers that need them (needs_student_topk), else None.
    segment_ids: (B, L) for rows packing several sequences (1, 2, ... per sequence, 0 on
      padding; position ids restart with each), else None: an in-process teacher attends
      within each (opd_fast.models.batch.packed_attention).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_mask: torch.Tensor
    k: int
    temperature: float
    vocab: int
    dtype: torch.dtype
    answer_form: str = LOGITS
    student_topk_ids: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None

    def __post_init__(self):
        if self.answer_form not in ANSWER_FORMS:
            raise ValueError(f"answer_form must be one of {ANSWER_FORMS}, got {self.answer_form!r}")


@runtime_checkable
class Teacher(Protocol):
    vocab_size: int  # output rows
    variants: tuple[str, ...]  # the variants whose loss it scores exactly
    needs_student_topk: bool  # True: score() reads request.student_topk_ids
    local_model: torch.nn.Module | None  # the model, when in this process (to sample from)

    def score(self, request: ScoreRequest) -> TeacherAnswer:
        """Teacher logits (B, L-1, vocab) in request.dtype, a LinearTeacher of (B, L-1, H)
        hidden states, or a TeacherPayload shaped (B, L-1, ...) for the student's top-k ids."""


class PayloadScoring:
    """Base of the teachers that answer with payloads: `score` asks about the student's top-k.

    A subclass checks a request (`check_request`) and answers the spans of a PayloadBatch
    (`answer`); `answer_dtype` and `unknown` say how the answer arrays start out.
    """

    needs_student_topk = True
    local_model = None
    answer_dtype = np.float32
    unknown = 0.0  # what an unanswered log-prob or entropy reads (NaN: cannot tell)

    def score(self, request: ScoreRequest) -> TeacherPayload:
        if request.segment_ids is not None:
            raise ValueError(
                f"{type(self).__name__} scores one sequence per row; packed rows "
                "(pack_sequences) need an in-process teacher"
            )
        if request.student_topk_ids is None:
            raise ValueError(
                f"{type(self).__name__} answers with a payload for the student's top-k ids: "
                "the request must carry student_topk_ids"
            )
        return self.payload(
            request.input_ids,
            request.attention_mask,
            request.response_mask,
            request.student_topk_ids,
            request.k,
            request.temperature,
            request.vocab,
        )

    def payload(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor,
        requested_ids: torch.Tensor,
        k: int,
        temperature: float,
        vocab_limit: int,
    ) -> TeacherPayload:
        """Score sequences (B, L): for every position t < L - 1 where response_mask (B, L-1) is
        True, the teacher's next-token distribution over ids < vocab_limit at `temperature`,
        as a TeacherPayload shaped (B, L-1, ...); requested_ids (B, L-1, k) are the ids asked
        about, the sampled tokens input_ids[:, 1:]. Other positions hold finite filler."""
        self.check_request(k, temperature, vocab_limit)
        batch = PayloadBatch(
            input_ids,
            attention_mask,
            response_mask,
            requested_ids,
            k,
            dtype=self.answer_dtype,
            unknown=self.unknown,
        )
        self.answer(batch, k, temperature, vocab_limit)
        return batch.payload()

    def check_request(self, k: int, temperature: float, vocab_limit: int) -> None:
        """Raise ValueError naming what this teacher cannot score."""

    def answer(self, batch: PayloadBatch, k: int, temperature: float, vocab_limit: int) -> None:
        """Fill `batch` (batch.fill) at every position of batch.spans."""
        raise NotImplementedError


def check_variant(teacher: Teacher, variant: str) -> None:
    """Raise ValueError naming the problem unless `teacher` scores `variant` exactly."""
    if variant in teacher.variants:
        return
    need = "full logits" if variant in NEEDS_TEACHER_LOGITS else "log-probs it cannot return"
    raise ValueError(
        f"variant {variant!r} needs the teacher's {need}; {type(teacher).__name__} scores "
        f"{', '.join(teacher.variants)} exactly"
    )
