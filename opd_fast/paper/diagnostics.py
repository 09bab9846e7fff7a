"""Diagnostics of a student/teacher pair on student rollouts (no training).

- per-token metrics of rollouts, scored with the fused op and any teacher (`score_rollouts`)
- AUROC of the sequence mean reward mean_t (log q(y_t) - log p(y_t)) for correct vs incorrect
  rollouts (`sequence_auroc`; the paper reports 0.73 and 0.75)
- any per-token metric by response position, in chunks (`position_profile`), e.g. the entropy
  profile whose back-to-front spread the paper observes on long responses
- the teacher's accuracy advantage when continuing student prefixes of increasing length
  (`prefix_advantage`; the paper: +0.37 at a 1K-token prefix down to +0.02 at 16K)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_fast.training.grading import is_correct
from opd_fast.training.metrics import StepMetrics
from opd_fast.training.pair import Pair
from opd_fast.training.rollouts import RolloutBatch, SamplingSettings
from opd_fast.training.rollouts.hf import HFEngine
from opd_fast.training.rollouts.sampling import encode_prompts
from opd_fast.training.step.score import LossSettings, score_batch


@dataclass
class ScoredRollouts:
    """Per-token metrics (B, L-1) of a rollout batch, and what each sequence earned."""

    batch: RolloutBatch
    mask: torch.Tensor  # (B, L-1) response positions
    token_metrics: dict[str, torch.Tensor]  # name -> (B, L-1)
    metrics: dict[str, float]  # means over response tokens
    correct: list[bool]


@torch.no_grad()
def score_rollouts(
    pair: Pair,
    batch: RolloutBatch,
    answers: list[str],
    *,
    k: int = 16,
    variant: str = "student_topk",
    temperature: float = 1.0,
    batch_size: int = 16,
) -> ScoredRollouts:
    """Score every response position of `batch` with the fused op (metrics only): the pair's
    student against its teacher (in process or remote), over the columns both share."""
    settings = LossSettings(k, variant, "pg", temperature, pair.vocab)
    pieces: dict[str, list[torch.Tensor]] = {}
    totals = StepMetrics()
    sequences = batch.input_ids.shape[0]
    width = batch.input_ids.shape[1] - 1
    for start in range(0, sequences, batch_size):
        micro = batch.select(start, min(start + batch_size, sequences))
        scored = score_batch(pair.student, pair.teacher, micro, settings)
        totals.add(scored.output.metrics)
        for name, values in scored.output.token_metrics.items():
            padded = values.new_zeros(values.shape[0], width)
            padded[:, : values.shape[1]] = torch.where(
                scored.response_mask, values, torch.zeros_like(values)
            )
            pieces.setdefault(name, []).append(padded.float().cpu())
    token_metrics = {name: torch.cat(parts) for name, parts in pieces.items()}
    correct = [is_correct(r, a) for r, a in zip(batch.responses, answers)]
    return ScoredRollouts(
        batch=batch,
        mask=batch.response_mask[:, 1:].cpu(),
        token_metrics=token_metrics,
        metrics=totals.means(),
        correct=correct,
    )


def sequence_mean_reward(scored: ScoredRollouts) -> torch.Tensor:
    """mean_t (log q(y_t) - log p(y_t)) per sequence, (B,)."""
    reward = -scored.token_metrics["sampled_token_kl"]
    mask = scored.mask.float()
    return (reward * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)


def auroc(scores: torch.Tensor, labels: list[bool]) -> float | None:
    """Area under the ROC curve (Mann-Whitney U, ties count half); None with one class only."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    positive = torch.tensor(labels, dtype=torch.bool)
    n_positive, n_negative = int(positive.sum()), int((~positive).sum())
    if n_positive == 0 or n_negative == 0:
        return None
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (n_positive * n_negative))


def sequence_auroc(scored: ScoredRollouts) -> float | None:
    """How well the sequence mean reward separates correct from incorrect rollouts."""
    return auroc(sequence_mean_reward(scored), scored.correct)


def position_profile(scored: ScoredRollouts, metric: str, chunks: int = 8) -> list[float | None]:
    """Mean of a per-token metric over `chunks` equal slices of response positions (relative
    to where each response starts), None for a slice no response reaches."""
    values, mask = scored.token_metrics[metric], scored.mask
    starts = mask.float().argmax(dim=1)
    lengths = mask.sum(dim=1)
    longest = int(lengths.max()) if lengths.numel() else 0
    if longest == 0:
        return [None] * chunks
    offsets = torch.arange(mask.shape[1])[None, :] - starts[:, None]
    bucket = (offsets.clamp_min(0) * chunks) // max(longest, 1)
    profile = []
    for index in range(chunks):
        selected = mask & (bucket == index)
        count = int(selected.sum())
        profile.append(float(values[selected].mean()) if count else None)
    return profile


@torch.no_grad()
def prefix_advantage(
    student,
    teacher,
    tokenizer,
    prompts: list[str],
    answers: list[str],
    prefix_fractions: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75),
    *,
    eos_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.7,
    top_p: float = 0.95,
) -> list[dict]:
    """Continue student-written prefixes (a fraction of each student response, in tokens) with
    the teacher and with the student; per fraction, both accuracies and the teacher's advantage
    (the answer is graded on prefix + continuation)."""
    prompt_ids = encode_prompts(tokenizer, prompts)
    eos_ids = tuple(eos_ids)
    base = HFEngine(student, tokenizer).generate(
        prompt_ids, SamplingSettings(eos_ids=eos_ids, max_new_tokens=max_new_tokens)
    )
    continuing = SamplingSettings(
        eos_ids=eos_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p
    )
    rows = []
    for fraction in prefix_fractions:
        prefixes = []
        for row in range(len(prompts)):
            response_ids = base.sequence(row)[1]
            prefixes.append(response_ids[: int(len(response_ids) * fraction)])
        continued = [ids + prefix for ids, prefix in zip(prompt_ids, prefixes)]
        accuracy = {}
        for name, model in (("teacher", teacher), ("student", student)):
            batch = HFEngine(model, tokenizer).generate(continued, continuing)
            graded = [
                is_correct(
                    tokenizer.decode(prefix, skip_special_tokens=True) + " " + response, answer
                )
                for prefix, response, answer in zip(prefixes, batch.responses, answers)
            ]
            accuracy[name] = sum(graded) / len(graded)
        rows.append(
            {
                "prefix_fraction": fraction,
                "teacher_accuracy": accuracy["teacher"],
                "student_accuracy": accuracy["student"],
                "teacher_advantage": accuracy["teacher"] - accuracy["student"],
            }
        )
    return rows
