"""Stage 1 of a training step: the step's prompts, answered by the student through the run's
rollout engine: right before the step (the synchronous loop), or ahead of it by a thread
beside the trainer, with weights a bounded number of updates old (`RolloutsAhead`)."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

from opd_fast.training.data import Example
from opd_fast.training.rollouts import RolloutBatch, RolloutEngine, SamplingSettings
from opd_fast.training.rollouts.sampling import sample_examples


def sample(
    run, engine: RolloutEngine, examples: list[Example], repeats: int, temperature, top_p
) -> tuple[RolloutBatch, list[Example]]:
    """`repeats` responses of `engine`'s model to each example, as the run's config samples
    them (its EOS ids, length limit and shared vocabulary), with the engine awake only while
    it samples. Also what the evaluation samples with."""
    config = run.config
    settings = SamplingSettings(
        eos_ids=tuple(run.pair.eos_ids),
        max_new_tokens=config.max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        vocab_limit=run.pair.vocab,
    )
    engine.wake()
    try:
        return sample_examples(
            engine,
            run.pair.tokenizer,
            examples,
            repeats=repeats,
            template=config.prompt_template,
            settings=settings,
        )
    finally:
        engine.sleep()  # the trainer's turn: the engine's memory back where vLLM allows


def sample_rollouts(run) -> tuple[RolloutBatch, list[Example]]:
    """This rank's rollouts of the step: every rank draws the whole step's prompts (the
    sampler stays the same everywhere) and keeps its share."""
    config = run.config
    examples = run.dist.split(run.sampler.next_batch(config.prompts_per_step))
    return sample(
        run,
        run.engine,
        examples,
        config.rollouts_per_prompt,
        config.rollout_temperature,
        config.rollout_top_p,
    )


# ---- rollouts beside training (max_staleness > 0) ----------------------------------------


def rollout_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed the rollouts of `step` are sampled with when they run beside training:
    what they draw depends on the step, never on when the sampling thread got to it."""
    return (seed * 0x9E3779B1 + rank * 0x85EBCA77 + step * 0xC2B2AE3D) % (2**63)


@dataclass
class InFlight:
    """Rollouts of a step sampled ahead: with the engine's weights after `version` updates."""

    step: int
    version: int
    batch: RolloutBatch
    examples: list[Example]


class RolloutsAhead:
    """Rollouts sampled by a thread beside the trainer, exactly `staleness` updates behind:
    the rollouts of step t are sampled with the weights after update max(0, t - 1 -
    staleness), so that sampling step t + staleness overlaps training step t. The schedule is
    fixed, and each step's sampling is seeded by its number (rollout_seed), so a run (and a
    resumed one) samples the same rollouts however the two threads interleave.

    The engine must hold its own weights (the hf engine's copy, vLLM's): the trainer updates
    the student while the thread samples. `weights_updated(t)` waits until step t + staleness
    is sampled (the last that needs the older weights), then syncs the engine. At most
    `staleness` steps wait in the queue. `engine_turn()` lends the engine to the evaluation.
    """

    def __init__(self, run, staleness: int, version: int, queued: list[InFlight] | None = None):
        self.run, self.staleness = run, staleness
        self.version = version  # updates the engine's weights carry
        self.queued: dict[int, InFlight] = {item.step: item for item in queued or []}
        self.next_step = max(self.queued, default=version) + 1  # the next step to sample
        self.lock = threading.Lock()  # the engine: one sampler at a time
        self.changed = threading.Condition()
        self.error: BaseException | None = None
        self.stopping = False
        # A new thread starts with OpenMP's default thread count, not the trainer's; vLLM's CPU
        # attention checks that its metadata and its forward agree on the count.
        self.threads = torch.get_num_threads()
        self.thread = threading.Thread(target=self._sample_ahead, name="opd-rollouts", daemon=True)
        self.thread.start()

    def _weights_for(self, step: int) -> int:
        return max(0, step - 1 - self.staleness)

    def _sample_ahead(self) -> None:
        config, dist = self.run.config, self.run.dist
        torch.set_num_threads(self.threads)
        try:
            while True:
                with self.changed:
                    self.changed.wait_for(
                        lambda: (
                            self.stopping
                            or (
                                self.next_step <= config.steps
                                and self.version >= self._weights_for(self.next_step)
                            )
                        )
                    )
                    if self.stopping:
                        return
                    step = self.next_step
                with self.lock:
                    torch.manual_seed(rollout_seed(config.seed, dist.rank, step))
                    batch, examples = sample_rollouts(self.run)
                    item = InFlight(step, self.version, batch, examples)
                with self.changed:
                    self.queued[step] = item
                    self.next_step = step + 1
                    self.changed.notify_all()
        except BaseException as error:  # raised in the trainer's thread, at its next wait
            with self.changed:
                self.error = error
                self.changed.notify_all()

    def _wait(self, ready) -> None:
        with self.changed:
            self.changed.wait_for(lambda: self.error is not None or ready())
            if self.error is not None:
                raise RuntimeError(f"the rollout thread failed: {self.error}") from self.error

    def take(self, step: int) -> InFlight:
        """The rollouts of `step` (waiting for them)."""
        self._wait(lambda: step in self.queued)
        with self.changed:
            self.changed.notify_all()
            return self.queued.pop(step)

    def weights_updated(self, step: int) -> None:
        """After update `step`: once step + staleness is sampled with the older weights, the
        engine takes the new ones."""
        last = min(step + self.staleness, self.run.config.steps)
        self._wait(lambda: self.next_step > last)
        with self.lock:
            self.run.engine.sync_weights(self.run.student)
        with self.changed:
            self.version = step
            self.changed.notify_all()

    @contextlib.contextmanager
    def engine_turn(self):
        """The engine for the caller alone (the evaluation), between two samplings."""
        with self.lock:
            yield

    def in_flight(self) -> tuple[list[InFlight], dict]:
        """(the rollouts sampled ahead, the prompt sampler's state after them), consistent:
        taken between two samplings. What a checkpoint keeps."""
        with self.lock, self.changed:
            return sorted(self.queued.values(), key=lambda i: i.step), self.run.sampler.state_dict()

    def close(self) -> None:
        """Stop sampling (a sampling under way finishes) and wait for the thread."""
        with self.changed:
            self.stopping = True
            self.changed.notify_all()
        self.thread.join()
