"""The `hf` rollout engine: Hugging Face `generate` on the model in this process (KV cache,
stop at EOS). It samples the live model, so there are no weights to sync."""

from __future__ import annotations

import torch

from opd_fast.training.engines.base import RolloutEngine, SamplingSettings
from opd_fast.training.rollout import RolloutBatch, generate


class HFEngine(RolloutEngine):
    name = "hf"

    def __init__(self, model: torch.nn.Module, tokenizer, *, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def generate(
        self,
        prompt_ids: list[list[int]],
        settings: SamplingSettings,
        *,
        seeds: list[int] | None = None,
        example_index: list[int] | None = None,
    ) -> RolloutBatch:
        return generate(
            self.model,
            self.tokenizer,
            prompt_ids=prompt_ids,
            eos_ids=list(settings.eos_ids),
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            greedy=settings.greedy,
            batch_size=self.batch_size,
            example_index=example_index,
            vocab_limit=settings.vocab_limit,
        )
