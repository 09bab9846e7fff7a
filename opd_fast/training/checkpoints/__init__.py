"""Checkpoints: one interface whatever the parallelism, so the trainer never asks whether its
run is sharded.

A Checkpointer saves a step and loads one back:

    save(step, model, optimizer, tokenizer, trainer_state, *, final, metrics_lines)
        -> the step folder
    load(path, model, optimizer) -> the trainer state (model and optimizer restored in place)

`single` writes a single process's (the whole model as safetensors, the optimizer and RNG in
trainer_state.safetensors); `sharded` a multi-rank run's (torch.distributed.checkpoint shards,
each rank's RNG). Both seal their step folders the same way (`folders`: a manifest of
checksums, written last; the scan that finds the newest intact one; file system errors named),
store state so that loading runs no code (`state_format`), and `export` turns either kind into
a Hugging Face model folder.
"""

from __future__ import annotations

from typing import Protocol

from opd_fast.training.checkpoints.folders import (
    CheckpointError,
    CheckpointSaveError,
    find_checkpoint,
    latest_checkpoint,
    read_metrics_copy,
    set_rng_state,
    tidy,
)
from opd_fast.training.checkpoints.sharded import ShardedCheckpointer
from opd_fast.training.checkpoints.single import SingleProcessCheckpointer
from opd_fast.training.distributed import Distributed


class Checkpointer(Protocol):
    def save(
        self,
        step,
        model,
        optimizer,
        tokenizer,
        trainer_state: dict,
        *,
        final: bool,
        metrics_lines: list[str] | None = None,
    ) -> str:
        """Write checkpoint `step` (with a copy of metrics.jsonl's `metrics_lines`); every rank
        calls it. Returns the step folder."""

    def load(self, path: str, model, optimizer) -> dict:
        """Restore `path` into model and optimizer; returns the saved trainer state."""


def make_checkpointer(run_dir: str, dist: Distributed) -> Checkpointer:
    """The run's checkpointer: sharded under a process group, else single-process."""
    if dist.active:
        return ShardedCheckpointer(run_dir, dist)
    return SingleProcessCheckpointer(run_dir)


__all__ = [
    "CheckpointError",
    "CheckpointSaveError",
    "Checkpointer",
    "find_checkpoint",
    "latest_checkpoint",
    "make_checkpointer",
    "read_metrics_copy",
    "set_rng_state",
    "tidy",
]
