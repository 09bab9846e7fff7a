"""Teachers: every way of scoring student rollouts with a frozen teacher, behind one interface.

`base` holds the interface (Teacher, ScoreRequest: one call, `score`) that the trainer, the
cold start, the evaluation and the diagnostics use; `factory` builds the teacher a config
names, and is the one place that knows the kinds: `local` (a model in this process: hidden
states or full logits), `remote` (an `opd-fast serve-teacher` server: exact top-k payloads
over `http`, batched by `payload_batch`) and `openai` (an OpenAI-compatible engine's prompt
log-probs).

Imports: opd_fast.wire, opd_fast.op, opd_fast.models.
"""

from opd_fast.teachers.base import (
    HIDDEN_STATES,
    LOGITS,
    ScoreRequest,
    Teacher,
    TeacherAnswer,
    check_variant,
)
from opd_fast.teachers.factory import TeacherSpec, build_teacher
from opd_fast.teachers.http import (
    RetryPolicy,
    TeacherAuthError,
    TeacherClient,
    TeacherError,
    TeacherProtocolError,
    TeacherRequestError,
    TeacherUnavailableError,
)
from opd_fast.teachers.local import LocalTeacher
from opd_fast.teachers.openai import OpenAITeacher
from opd_fast.teachers.remote import RemoteTeacher

__all__ = [
    "HIDDEN_STATES",
    "LOGITS",
    "LocalTeacher",
    "OpenAITeacher",
    "RemoteTeacher",
    "RetryPolicy",
    "ScoreRequest",
    "Teacher",
    "TeacherAnswer",
    "TeacherAuthError",
    "TeacherClient",
    "TeacherError",
    "TeacherProtocolError",
    "TeacherRequestError",
    "TeacherSpec",
    "TeacherUnavailableError",
    "build_teacher",
    "check_variant",
]
