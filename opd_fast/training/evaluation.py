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
    teacher = run.teacher.local_model
    if with_teacher and teacher is not None:
        # Sampling the teacher's answers must not move the random stream that the
        # student's rollouts draw from: a run with a remote teacher (which cannot be
        # evaluated here) then sees the same rollouts as one with the teacher in process.
        devices = [run.device] if run.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            engine = make_engine(
                "hf", teacher, run.tokenizer, batch_size=run.config.rollout_batch_size
            )
            record["teacher_accuracy"] = accuracy(run, engine, run.eval_examples)
    run.log.write(record)
    return record
