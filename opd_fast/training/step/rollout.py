"""Stage 1 of a training step: the step's prompts, answered by the student through the run's
rollout engine."""

from __future__ import annotations

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
