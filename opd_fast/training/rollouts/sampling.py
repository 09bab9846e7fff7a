"""The one way anything here samples responses to prompts (the student's rollouts, the
evaluation, the cold start's teacher data, the paper's diagnostics): repeat each example,
render it with the prompt template, encode it, and generate with a rollout engine.
"""

from __future__ import annotations

import torch

from opd_fast.training.data import Example, render_prompt
from opd_fast.training.rollouts.base import RolloutEngine, SamplingSettings
from opd_fast.training.rollouts.batch import RolloutBatch


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [tokenizer(prompt, add_special_tokens=True)["input_ids"] for prompt in prompts]


def sample_examples(
    engine: RolloutEngine,
    tokenizer,
    examples: list[Example],
    *,
    repeats: int,
    template: str,
    settings: SamplingSettings,
) -> tuple[RolloutBatch, list[Example]]:
    """`repeats` responses to each example with `engine`. A seeded engine gets one seed per
    sequence from torch's generator, so a run's seed (and a resumed run's restored generator)
    fixes its samples. Returns the batch and the example each sequence answers."""
    repeated = [example for example in examples for _ in range(repeats)]
    prompts = [render_prompt(example, template, tokenizer) for example in repeated]
    prompt_ids = encode_prompts(tokenizer, prompts)
    seeds = torch.randint(0, 2**31 - 1, (len(prompt_ids),)).tolist() if engine.seeded else None
    return engine.generate(prompt_ids, settings, seeds=seeds), repeated
