"""Teacher serving: a scoring server that answers with exact top-k payloads (OPD_SPEC.md
section 6) instead of (T, V) logits, its client, the trainer's RemoteTeacher, and an adapter
for teachers behind OpenAI-compatible inference servers. User guide: docs/serving.md.

    opd-fast serve-teacher --model DIR [--host 127.0.0.1] [--port 8000] [--token SECRET]
    opd-fast train --set teacher_url=http://127.0.0.1:8000 --set teacher_token=SECRET ...
"""

from opd_fast.serving.client import (
    RetryPolicy,
    TeacherAuthError,
    TeacherClient,
    TeacherError,
    TeacherProtocolError,
    TeacherRequestError,
    TeacherUnavailableError,
)
from opd_fast.serving.remote_teacher import RemoteTeacher

__all__ = [
    "RemoteTeacher",
    "RetryPolicy",
    "TeacherAuthError",
    "TeacherClient",
    "TeacherError",
    "TeacherProtocolError",
    "TeacherRequestError",
    "TeacherUnavailableError",
]
