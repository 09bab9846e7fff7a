"""Off-policy cold start: sample teacher responses, filter them, SFT the student on them.

The paper rescues a student whose thinking pattern differs from the teacher's by first
fine-tuning it on teacher outputs (then OPD). Filters drop responses that hit the length limit
without EOS and degenerate, repetitive ones; `only_correct` also drops wrong answers.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass

import torch

from opd_fast.models.vocabulary import eos_token_ids
from opd_fast.training.data import Example
from opd_fast.training.grading import is_correct
from opd_fast.training.pair import Pair
from opd_fast.training.rollouts import (
    RolloutEngine,
    SamplingSettings,
    make_engine,
    sample_examples,
)


@dataclass(frozen=True)
class SFTSettings:
    responses_per_prompt: int = 2
    max_new_tokens: int = 256
    temperature: float = 1.0
    only_correct: bool = False
    max_repeated_ngram_fraction: float = 0.5  # drop responses whose 4-grams repeat this much
    steps: int = 100
    batch_size: int = 32
    lr: float = 1e-5
    seed: int = 0


def repeated_ngram_fraction(tokens: list[int], n: int = 4) -> float:
    """Fraction of a sequence's n-grams that repeat an earlier one (0 for short sequences)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


@dataclass
class TeacherData:
    pairs: list[tuple[list[int], list[int]]]  # (prompt ids, response ids incl. EOS)
    kept: int
    dropped_truncated: int
    dropped_repetitive: int
    dropped_incorrect: int


@torch.no_grad()
def teacher_responses(
    teacher,
    tokenizer,
    examples: list[Example],
    template: str,
    eos_ids: list[int],
    settings: SFTSettings,
    vocab_limit: int | None = None,
    engine: RolloutEngine | None = None,
) -> TeacherData:
    """Sample and filter teacher responses to `examples`; vocab_limit: the shared vocabulary
    (the teacher must not emit ids the student cannot read); engine: the rollout engine that
    samples the teacher (default: Hugging Face generate on `teacher`)."""
    batch, repeated = sample_examples(
        engine or make_engine("hf", teacher, tokenizer),
        tokenizer,
        examples,
        repeats=settings.responses_per_prompt,
        template=template,
        settings=SamplingSettings(
            eos_ids=tuple(eos_ids),
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            vocab_limit=vocab_limit,
        ),
    )
    pairs, truncated, repetitive, incorrect = [], 0, 0, 0
    for row, example in enumerate(repeated):
        prompt, response = batch.sequence(row)
        if batch.truncated[row]:
            truncated += 1
        elif repeated_ngram_fraction(response) > settings.max_repeated_ngram_fraction:
            repetitive += 1
        elif settings.only_correct and not is_correct(batch.responses[row], example.answer):
            incorrect += 1
        else:
            pairs.append((prompt, response))
    return TeacherData(pairs, len(pairs), truncated, repetitive, incorrect)


def sft(
    student,
    tokenizer,
    pairs: list[tuple[list[int], list[int]]],
    settings: SFTSettings,
    progress: bool = True,
) -> list[float]:
    """Cross-entropy on response tokens, AdamW, cosine schedule; returns the loss per step."""
    if not pairs:
        raise ValueError("cold start: no teacher responses survived the filters")
    device = next(student.parameters()).device
    trainable = [p for p in student.parameters() if p.requires_grad]  # LoRA: the adapters
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / settings.steps, 1.0)))
    )
    order_rng = random.Random(settings.seed)
    student.train()
    losses = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=settings.steps, desc="cold-start SFT", unit="step")
    for _ in range(settings.steps):
        chosen = [pairs[order_rng.randrange(len(pairs))] for _ in range(settings.batch_size)]
        length = max(len(p) + len(r) for p, r in chosen)
        input_ids = torch.full((len(chosen), length), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(chosen), length), -100, dtype=torch.long)
        attention = torch.zeros((len(chosen), length), dtype=torch.long)
        for row, (prompt, response) in enumerate(chosen):
            sequence = prompt + response
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            labels[row, len(prompt) : len(sequence)] = torch.tensor(response)
            attention[row, : len(sequence)] = 1
        output = student(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            labels=labels.to(device),
            use_cache=False,
        )
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(output.loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    student.eval()
    return losses


def cold_start(
    pair: Pair,
    examples: list[Example],
    template: str,
    settings: SFTSettings,
    out_dir: str,
    progress: bool = True,
    engine: RolloutEngine | None = None,
) -> dict:
    """Teacher responses -> filter -> SFT the pair's student in place -> save it to out_dir.
    Returns a report (also written to out_dir/cold_start.json). The teacher samples, so it
    must be in this process. engine: what samples the teacher (default: Hugging Face generate)."""
    teacher = pair.teacher.local_model
    if teacher is None:
        raise ValueError(
            "the cold start samples from the teacher, which must be in process "
            "(a model directory, not a teacher server)"
        )
    student, tokenizer = pair.student, pair.tokenizer
    eos_ids = eos_token_ids(tokenizer, teacher)
    data = teacher_responses(
        teacher,
        tokenizer,
        examples,
        template,
        eos_ids,
        settings,
        vocab_limit=pair.vocab,
        engine=engine,
    )
    losses = sft(student, tokenizer, data.pairs, settings, progress=progress)
    temporary = out_dir.rstrip("/") + f".tmp-{os.getpid()}"
    student.save_pretrained(temporary, safe_serialization=True)
    tokenizer.save_pretrained(temporary)
    report = {
        "kept": data.kept,
        "dropped_truncated": data.dropped_truncated,
        "dropped_repetitive": data.dropped_repetitive,
        "dropped_incorrect": data.dropped_incorrect,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "settings": settings.__dict__,
    }
    with open(os.path.join(temporary, "cold_start.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    if os.path.exists(out_dir):
        import shutil

        shutil.rmtree(out_dir)
    os.replace(temporary, out_dir)
    return report


def cold_start_run(run) -> dict:
    """A run's cold start, as its config sets it (cold_start_* keys): the teacher sampled by
    the run's rollout engine kind, the student fine-tuned in place and pushed to the engine.
    Writes <run_dir>/cold_start_model and a `cold_start` record; returns the report."""
    config = run.config
    settings = SFTSettings(
        responses_per_prompt=config.cold_start_responses_per_prompt,
        max_new_tokens=config.max_new_tokens,
        temperature=config.rollout_temperature,
        only_correct=config.cold_start_only_correct,
        steps=config.cold_start_steps,
        batch_size=config.cold_start_batch_size,
        lr=config.cold_start_lr,
        seed=config.seed,
    )
    teacher_engine = None
    if run.teacher.local_model is not None:
        teacher_engine = run.engine_for(run.teacher.local_model, run.paths["teacher"])
    try:
        report = cold_start(
            run.pair,
            run.train_examples,
            config.prompt_template,
            settings,
            os.path.join(config.run_dir, "cold_start_model"),
            progress=config.progress,
            engine=teacher_engine,
        )
    finally:
        if teacher_engine is not None:
            teacher_engine.close()
    run.engine.sync_weights(run.student)  # OPD starts from the fine-tuned student
    run.log.write(
        {
            "kind": "cold_start",
            "step": 0,
            **{k: v for k, v in report.items() if k != "settings"},
        }
    )
    return report
