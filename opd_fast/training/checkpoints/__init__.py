"""Checkpoints: one interface whatever the parallelism, so the trainer never asks whether its
run is sharded.

A Checkpointer saves a step and loads one back:

    save(step, model, optimizer, tokenizer, trainer_state, *, final) -> the step folder
    load(path, model, optimizer) -> the trainer state (model and optimizer restored in place)

`single` writes a single process's (the whole model as safetensors, the optimizer and RNG in
trainer_state.pt); `sharded` a multi-rank run's (torch.distributed.checkpoint shards, each
rank's RNG). Both seal their step folders the same way (`folders`: a manifest of checksums,
written last; the scan that finds the newest intact one), and `export` turns either kind into
a Hugging Face model folder.
"""

from __future__ import annotations

from typing import Protocol

from opd_fast.training.checkpoints.folders import (
    CheckpointError,
    find_checkpoint,
    latest_checkpoint,
    set_rng_state,
)
from opd_fast.training.checkpoints.sharded import ShardedCheckpointer
from opd_fast.training.checkpoints.single import SingleProcessCheckpointer
from opd_fast.training.distributed import Distributed


class Checkpointer(Protocol):
    def save(self, step, model, optimizer, tokenizer, trainer_state: dict, *, final: bool) -> str:
        """Write checkpoint `step`; every rank calls it. Returns the step folder."""

    def load(self, path: str, model, optimizer) -> dict:
        """Restore `path` into model and optimizer; returns the saved trainer state."""


def make_checkpointer(run_dir: str, dist: Distributed) -> Checkpointer:
    """The run's checkpointer: sharded under a process group, else single-process."""
    if dist.active:
        return ShardedCheckpointer(run_dir, dist)
    return SingleProcessCheckpointer(run_dir)


__all__ = [
    "CheckpointError",
    "Checkpointer",
    "find_checkpoint",
    "latest_checkpoint",
    "make_checkpointer",
    "set_rng_state",
]
