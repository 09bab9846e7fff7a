"""The rollout-engine interface.

An engine samples responses to token-id prompts with the trainer's sampling settings and
returns a RolloutBatch: token ids, texts, truncation flags and the engine's log-prob of every
sampled token (under the distribution it sampled from), which the trainer compares with its
own (the off-policy gap). An engine that holds its own copy of the weights (vLLM) receives the
student's after every optimizer step (`sync_weights`) and may release its memory while the
trainer runs (`sleep` / `wake`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_fast.training.rollouts.batch import RolloutBatch


class EngineUnavailable(RuntimeError):
    """The engine cannot run here (its package is missing, or the model is not supported)."""


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are sampled: no top-k, no repetition penalty, ever (those would make the
    rollouts off-policy); ids at or past vocab_limit are never sampled (a padded embedding
    table's extra rows)."""

    eos_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    vocab_limit: int | None = None
    greedy: bool = False


class RolloutEngine:
    """Samples responses for prompts. Subclasses implement `generate`; engines with their own
    copy of the weights also `sync_weights`, and may `sleep`/`wake`."""

    name = "engine"
    holds_weights = False  # True: sync_weights after every optimizer step
    seeded = False  # True: generate takes a seed per prompt (drawn from torch's generator)
    last_sync_bytes = 0  # bytes the last sync_weights moved into the engine

    def generate(
        self,
        prompt_ids: list[list[int]],
        settings: SamplingSettings,
        *,
        seeds: list[int] | None = None,
        example_index: list[int] | None = None,
    ) -> RolloutBatch:
        """One response per prompt (repeat prompts for several). seeds: one per prompt, for
        engines that seed each request (vLLM); the HF engine draws from torch's generator."""
        raise NotImplementedError

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load `model`'s current weights into the engine (no-op for an engine that samples
        the model itself), and set last_sync_bytes. Under FSDP2 every rank calls it: the
        weights are gathered a unit at a time (opd_fast.training.distributed.full_state_items)."""

    def sleep(self) -> None:
        """Release the engine's memory while the trainer works (where the engine can)."""

    def wake(self) -> None:
        """Undo `sleep` before the next generate."""

    def close(self) -> None:
        """Free everything the engine holds."""
