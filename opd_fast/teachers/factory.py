"""The one place that knows the kinds of teacher: a TeacherSpec (from the config) in, a
Teacher (opd_fast.teachers.base) out, its tokenizer and variant checked before training starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from opd_fast.models.loading import Placement, load_model, load_tokenizer
from opd_fast.models.vocabulary import check_tokenizers_match
from opd_fast.teachers.base import Teacher, check_variant

# How a teacher behind `url` answers.
OPD_FAST_API = "opd-fast"  # `opd-fast serve-teacher`: exact payloads for every variant but one
OPENAI_API = "openai"  # an OpenAI-compatible engine's prompt log-probs (e.g. vLLM)
APIS = (OPD_FAST_API, OPENAI_API)


@dataclass(frozen=True)
class TeacherSpec:
    """Which teacher scores the rollouts: a model directory loaded into this process (`path`),
    or a server at `url` speaking `api`.

    token: the server's bearer token (api key). model: the name an OpenAI-compatible engine
    serves the teacher under. batch_size: sequences per forward of an in-process teacher.
    wait_s: how long a server that cannot be reached is retried (at start and on every
    request) before TeacherUnavailableError; long enough to bridge a restart.
    """

    path: str | None = None  # a folder, or a Hub id (resolved by the caller)
    revision: str | None = None  # of a Hub id
    url: str | None = None
    token: str | None = None
    api: str = OPD_FAST_API
    model: str | None = None
    batch_size: int = 8
    wait_s: float = 60.0

    @classmethod
    def from_config(cls, config) -> TeacherSpec:
        """From a TrainConfig's teacher keys (teacher_url wins over the teacher path)."""
        return cls(
            path=None if config.teacher_url else config.teacher,
            revision=config.teacher_revision,
            url=config.teacher_url,
            token=config.teacher_token,
            api=config.teacher_api,
            model=config.teacher_model,
            batch_size=config.teacher_batch_size,
            wait_s=config.teacher_wait_s,
        )


    @classmethod
    def from_entry(cls, name: str, entry, config) -> TeacherSpec:
        """From one entry of a config's `teachers` mapping: a model (a folder, a Hub id or
        "toy"), or a mapping of this class's fields (path or url; revision, token, api,
        model). ValueError naming `teachers.<name>` for any other shape."""
        where = f"config: teachers.{name}"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise ValueError(
                f"{where} must be a model (folder or Hub id) or a mapping of {ENTRY_KEYS}, "
                f"got {entry!r}"
            )
        unknown = sorted(set(entry) - set(ENTRY_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid: {', '.join(ENTRY_KEYS)}")
        for key, value in entry.items():
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{where}.{key} must be non-empty text, got {value!r}")
        if (entry.get("path") is None) == (entry.get("url") is None):
            raise ValueError(f"{where} needs exactly one of path (a model) and url (a server)")
        api = entry.get("api") or OPD_FAST_API
        if api not in APIS:
            raise ValueError(f"{where}.api must be one of {APIS}, got {api!r}")
        if api != OPD_FAST_API and not (entry.get("url") and entry.get("model")):
            raise ValueError(f"{where}: api {api!r} needs url and model")
        return cls(
            path=entry.get("path"),
            revision=entry.get("revision"),
            url=entry.get("url"),
            token=entry.get("token"),
            api=api,
            model=entry.get("model"),
            batch_size=config.teacher_batch_size,
            wait_s=config.teacher_wait_s,
        )


# The keys of one entry of a config's `teachers` mapping (TeacherSpec's own names).
ENTRY_KEYS = ("path", "revision", "url", "token", "api", "model")


def _retry(spec: TeacherSpec):
    from opd_fast.teachers.http import RetryPolicy

    return RetryPolicy(max_elapsed_s=spec.wait_s)


def build_teacher(
    spec: TeacherSpec,
    *,
    placement: Placement,
    tokenizer,
    student_rows: int,
    variant: str | None = None,
) -> Teacher:
    """The teacher `spec` names, checked: it uses the student's tokenizer and, when `variant`
    is given, scores that variant exactly. student_rows: the student's output rows, taken as
    an OpenAI-compatible engine's (it does not report its own)."""
    if spec.url is None:
        from opd_fast.teachers.local import LocalTeacher

        if spec.path is None:
            raise ValueError(
                "a teacher needs a model directory (teacher) or a server (teacher_url)"
            )
        check_tokenizers_match(tokenizer, load_tokenizer(spec.path))
        teacher = LocalTeacher(load_model(spec.path, placement, False), spec.batch_size)
    elif spec.api == OPD_FAST_API:
        from opd_fast.teachers.remote import RemoteTeacher

        teacher = RemoteTeacher(spec.url, token=spec.token, retry=_retry(spec))
        teacher.check_tokenizer(tokenizer)
    elif spec.api == OPENAI_API:
        from opd_fast.teachers.openai import OpenAITeacher

        if not spec.model:
            raise ValueError("an OpenAI-compatible teacher needs the served model's name")
        teacher = OpenAITeacher(
            spec.url,
            spec.model,
            variant=variant or "teacher_topk",
            vocab_size=student_rows,
            api_key=spec.token,
            retry=_retry(spec),
        )
        teacher.check_tokenizer(tokenizer)
    else:
        raise ValueError(f"unknown teacher api {spec.api!r}; expected one of {APIS}")
    if variant is not None:
        check_variant(teacher, variant)
    return teacher
