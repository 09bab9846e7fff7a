"""Loading a student and its teacher, the way every command does: "toy" resolved, the
student's tokenizer and model, the teacher built by the factory and checked against the
tokenizer (and the variant), the logit columns both share, the ids that end a response."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from opd_fast.models.hub import resolve_model
from opd_fast.models.loading import Placement, load_model, load_tokenizer
from opd_fast.models.vocabulary import eos_token_ids, output_rows, shared_vocab_size
from opd_fast.op.names import check_k
from opd_fast.teachers.base import Teacher, check_variant
from opd_fast.teachers.factory import TeacherSpec, build_teacher
from opd_fast.toy import resolve_toy


@dataclass
class Pair:
    placement: Placement
    tokenizer: object
    student: torch.nn.Module
    teacher: Teacher | None
    vocab: int  # logit columns both models share
    eos_ids: list[int]  # the student's end-of-response ids

    def with_teacher(
        self,
        teacher: TeacherSpec,
        *,
        variant: str | None = None,
        k: int | None = None,
        progress: bool = True,
        built_teacher: Teacher | None = None,
        teacher_placement: Placement | None = None,
    ) -> Pair:
        """This student with the teacher `teacher` names (or `built_teacher`: a custom one,
        or one a test made). variant: refuse a teacher that cannot score it exactly; k: refuse
        a k larger than the shared vocabulary, here, before any rollout. teacher_placement:
        where an in-process teacher loads (default: the student's placement)."""
        if built_teacher is None:
            path = resolve_toy({"teacher": teacher.path}, progress=progress)["teacher"]
            path = resolve_model(path, teacher.revision) if path else path
            built_teacher = build_teacher(
                dataclasses.replace(teacher, path=path),
                placement=teacher_placement or self.placement,
                tokenizer=self.tokenizer,
                student_rows=output_rows(self.student),
                variant=variant,
            )
        elif variant is not None:
            check_variant(built_teacher, variant)
        vocab = shared_vocab_size(
            output_rows(self.student), built_teacher.vocab_size, self.tokenizer
        )
        if k is not None:
            check_k(k, vocab, where="config: ")
        return dataclasses.replace(self, teacher=built_teacher, vocab=vocab)


def load_student(
    student: str,
    placement: Placement,
    *,
    trainable: bool,
    progress: bool = True,
    revision: str | None = None,
) -> Pair:
    """The student at `student` (a model directory, a Hub id at `revision`, or "toy"), its
    teacher still to come."""
    path = resolve_model(resolve_toy({"student": student}, progress=progress)["student"], revision)
    tokenizer = load_tokenizer(path)
    model = load_model(path, placement, trainable)
    vocab = output_rows(model)
    return Pair(placement, tokenizer, model, None, vocab, eos_token_ids(tokenizer, model))


def load_pair(
    student: str,
    teacher: TeacherSpec,
    placement: Placement,
    *,
    student_trainable: bool,
    progress: bool = True,
    student_revision: str | None = None,
    **teacher_checks,
) -> Pair:
    """The student at `student` with its teacher; teacher_checks: Pair.with_teacher's."""
    loaded = load_student(
        student,
        placement,
        trainable=student_trainable,
        progress=progress,
        revision=student_revision,
    )
    return loaded.with_teacher(teacher, progress=progress, **teacher_checks)
