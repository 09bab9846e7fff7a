"""Evaluation of a run: avg@n accuracy at the evaluation temperature and top-p, split over
ranks, for the student (through the run's rollout engine) and once for an in-process teacher
(as a reference, with Hugging Face generate)."""

from __future__ import annotations

import torch

from opd_fast.training.data import Example
from opd_fast.training.grading import is_correct
from opd_fast.training.rollouts import RolloutEngine, make_engine
from opd_fast.training.step.rollout import sample


def accuracy(run, engine: RolloutEngine, examples: list[Example]) -> float:
    """avg@n accuracy of `engine`'s model on `examples`, over all ranks."""
    config = run.config
    share, real = run.dist.padded_share(examples)
    batch, repeated = sample(
        run, engine, share, config.eval_samples, config.eval_temperature, config.eval_top_p
    )
    correct = [is_correct(r, e.answer) for r, e in zip(batch.responses, repeated)]
    real *= config.eval_samples
    correct, count = run.dist.sum([sum(correct[:real]), real])
    return correct / count


def evaluate(run, step: int, with_teacher: bool = False) -> dict:
    """The eval record of `step` (written to the run log): the student's accuracy, and with
    `with_teacher` the teacher's when its model is in this process."""
    record = {"kind": "eval", "step": step}
    record["student_accuracy"] = accuracy(run, run.engine, run.eval_examples)
    if with_teacher:
        record.update(teacher_accuracies(run))
    run.log.write(record)
    return record


def teacher_accuracies(run) -> dict:
    """teacher_accuracy: the in-process teacher's (with several teachers: each prompt answered
    by its own, and each teacher's on its prompts, teacher_accuracy/<name>); {} for a teacher
    that is not in this process."""
    groups = (
        {None: run.eval_examples} if run.routes is None else run.routes.split(run.eval_examples)
    )
    found, weighted = {}, 0.0
    for name, examples in groups.items():
        teacher = run.teacher_of(name).local_model
        if teacher is None:
            return {}  # a served teacher cannot be sampled here (nor the mixture)
        if not examples:
            continue
        # Sampling the teacher's answers must not move the random stream that the
        # student's rollouts draw from: a run with a remote teacher (which cannot be
        # evaluated here) then sees the same rollouts as one with the teacher in process.
        devices = [run.device] if run.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            engine = make_engine(
                "hf", teacher, run.tokenizer, batch_size=run.config.rollout_batch_size
            )
            value = accuracy(run, engine, examples)
        weighted += value * len(examples)
        if name is not None:
            found[f"teacher_accuracy/{name}"] = value
    if run.routes is None:
        found["teacher_accuracy"] = value
    else:  # every prompt answered by its own teacher
        found["teacher_accuracy"] = weighted / len(run.eval_examples)
    return found
