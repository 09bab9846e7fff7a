"""Stage 5 of a training step: the step's record in metrics.jsonl. Over ranks: sums of tokens
and token-weighted metric sums (so the means are the global batch's), the slowest rank's
times, the largest peaks."""

from __future__ import annotations

from opd_fast.training.data import Example
from opd_fast.training.grading import is_correct
from opd_fast.training.rollouts import RolloutBatch
from opd_fast.training.step.score import ScoredStep
from opd_fast.training.step.timing import StageTimer
from opd_fast.training.step.update import Update


def record_step(
    run,
    step: int,
    rollouts: tuple[RolloutBatch, list[Example]],
    scored: ScoredStep,
    update: Update,
    timer: StageTimer,
    rollout_peak_mib: float,
    staleness: int | None = None,
) -> dict:
    """The record of step `step` (written to the run log, and returned)."""
    dist = run.dist
    batch, examples = rollouts
    rewards = [is_correct(r, e.answer) for r, e in zip(batch.responses, examples)]
    dist.reduce_step_metrics(scored.metrics, scored.profile)
    loss, rewards, tokens, truncated, sequences, computed, real = dist.sum(
        [
            scored.loss,
            sum(rewards),
            batch.num_response_tokens,
            sum(batch.truncated),
            batch.input_ids.shape[0],
            scored.computed_tokens,
            int(batch.attention_mask.sum()),
        ]
    )
    seconds = dist.max(timer.seconds)
    teacher = seconds.get("teacher", 0.0)
    train = seconds["score"] + seconds["update"] - teacher  # the student's forward/backward
    record = {"kind": "train", "step": step, "loss": loss}
    record.update(scored.metrics.means())
    for name, metrics in scored.by_teacher.items():  # several teachers: each one's tokens
        dist.reduce_metrics(metrics)
        record.update({f"{metric}/{name}": value for metric, value in metrics.means().items()})
    record.update(scored.gap.means())
    record["position_profile"] = scored.profile.means()
    record.update(
        grad_norm=update.grad_norm,
        lr=update.lr,
        train_reward=rewards / sequences,
        mean_response_length=tokens / sequences,
        truncated_fraction=truncated / sequences,
        rollout_tokens_per_s=tokens / max(seconds["rollout"], 1e-9),
        teacher_tokens_per_s=tokens / max(teacher, 1e-9),
        train_tokens_per_s=tokens / max(train, 1e-9),
        weight_sync_seconds=seconds["sync"],
        weight_sync_bytes=run.engine.last_sync_bytes,
        step_seconds=seconds["rollout"] + seconds["score"] + seconds["update"] + seconds["sync"],
        # The step's own peaks: its rollouts', and its scoring + update's (the loss path's);
        # over ranks, the largest.
        # train_start_memory_mib: what was resident when scoring began (the models, the
        # optimizer state, the rollouts), so the peak above it is what scoring + update added.
        **dist.max(
            {
                "rollout_peak_memory_mib": rollout_peak_mib,
                "train_start_memory_mib": run.memory.started_mib,
                "train_peak_memory_mib": run.memory.peak_mib(),
                "peak_memory_mib": run.memory.overall_mib,
            }
        ),
        loss_path=run.loss_path,
        # Scoring's padding overhead: token positions its forwards computed per real token.
        computed_tokens_per_real_token=computed / max(real, 1),
    )
    record.update({f"{name}_seconds": value for name, value in seconds.items() if name != "sync"})
    if staleness is not None:  # rollouts sampled ahead, beside training
        record["rollout_staleness"] = staleness
    run.log.write(record)
    return record
