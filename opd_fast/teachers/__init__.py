"""Teachers: every way of scoring student rollouts with a frozen teacher, behind one interface.

`base` holds the interface (Teacher, ScoreRequest) that the trainer, the cold start, the
evaluation and the diagnostics call; `factory` builds the teacher a config names. The kinds:
`local` (a model in this process: full logits), `remote` (an `opd-fast serve-teacher`
server: exact top-k payloads over `http`, batched by `payload_batch`) and `openai` (an
OpenAI-compatible engine's prompt log-probs).

Imports: opd_fast.op, opd_fast.models and the wire format opd_fast.serving.protocol.
"""

from opd_fast.teachers.base import LOGITS, PAYLOAD, ScoreRequest, Teacher, check_variant
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
    "LOGITS",
    "PAYLOAD",
    "LocalTeacher",
    "OpenAITeacher",
    "RemoteTeacher",
    "RetryPolicy",
    "ScoreRequest",
    "Teacher",
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
