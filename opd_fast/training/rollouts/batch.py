"""The batch every rollout engine returns: sequences packed as [prompt][response],
right-padded (opd_fast.models.batch), with explicit position ids, so that training forwards
see exactly the positions generation saw; and which tokens are the response.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_fast.models.batch import right_padded


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # (B, L) prompt + response, right-padded
    attention_mask: torch.Tensor  # (B, L) 1 on real tokens
    response_mask: torch.Tensor  # (B, L) True on response tokens (through EOS)
    position_ids: torch.Tensor  # (B, L)
    example_index: list[int]  # which prompt each sequence answers
    responses: list[str]
    truncated: list[bool]  # hit max_new_tokens without EOS
    # (B, L) float32: the engine's log-prob of each response token under the distribution it
    # sampled from (temperature, top-p and the vocabulary limit applied); 0 elsewhere. None
    # when the sampler does not report them.
    engine_log_probs: torch.Tensor | None = None

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    def sequence(self, row: int) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids) of sequence `row`."""
        total = int(self.attention_mask[row].sum())
        prompt = total - int(self.response_mask[row].sum())
        ids = self.input_ids[row, :total].tolist()
        return ids[:prompt], ids[prompt:]

    def select(self, start: int, end: int) -> RolloutBatch:
        """Sequences [start, end), trimmed to their longest real length."""
        length = int(self.attention_mask[start:end].sum(dim=1).max())
        return RolloutBatch(
            input_ids=self.input_ids[start:end, :length],
            attention_mask=self.attention_mask[start:end, :length],
            response_mask=self.response_mask[start:end, :length],
            position_ids=self.position_ids[start:end, :length],
            example_index=self.example_index[start:end],
            responses=self.responses[start:end],
            truncated=self.truncated[start:end],
            engine_log_probs=None
            if self.engine_log_probs is None
            else self.engine_log_probs[start:end, :length],
        )


def pack(sequences, tokenizer, device, example_index) -> RolloutBatch:
    """A RolloutBatch of (prompt ids, response ids, truncated, response log-probs or None)."""
    tokens = right_padded(
        [prompt + response for prompt, response, _, _ in sequences], tokenizer.pad_token_id
    )
    count, length = tokens.input_ids.shape
    response_mask = torch.zeros((count, length), dtype=torch.bool)
    with_log_probs = all(log_probs is not None for _, _, _, log_probs in sequences)
    engine_log_probs = torch.zeros((count, length), dtype=torch.float32)
    for row, (prompt, response, _, log_probs) in enumerate(sequences):
        total = len(prompt) + len(response)
        response_mask[row, len(prompt) : total] = True
        if with_log_probs and response:
            engine_log_probs[row, len(prompt) : total] = torch.tensor(log_probs)
    responses = tokenizer.batch_decode(
        [response for _, response, _, _ in sequences], skip_special_tokens=True
    )
    return RolloutBatch(
        input_ids=tokens.input_ids.to(device),
        attention_mask=tokens.attention_mask.to(device),
        response_mask=response_mask.to(device),
        position_ids=tokens.position_ids.to(device),
        example_index=list(example_index),
        responses=responses,
        truncated=[truncated for _, _, truncated, _ in sequences],
        engine_log_probs=engine_log_probs.to(device) if with_log_probs else None,
    )
