"""The batch every rollout engine returns: sequences packed as [prompt][response],
right-padded (opd_fast.models.batch), with explicit position ids, so that training forwards
see exactly the positions generation saw; and which tokens are the response.
"""

from __future__ import annotations

import dataclasses
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
    # (B, L) 1, 2, ... for the sequences packed in a row, 0 on padding: only in the packed
    # micro-batches scoring forms (`packed`); None, one sequence per row, everywhere else.
    segment_ids: torch.Tensor | None = None

    def state_dict(self) -> dict:
        """Tensors and lists to save in a checkpoint (from_state rebuilds the batch)."""
        return {
            name: getattr(self, name)
            for name in (
                "input_ids", "attention_mask", "response_mask", "position_ids", "example_index",
                "responses", "truncated", "engine_log_probs", "segment_ids",
            )
        }  # fmt: skip

    @classmethod
    def from_state(cls, state: dict, device=None) -> RolloutBatch:
        return cls(
            **{
                name: value.to(device) if isinstance(value, torch.Tensor) and device else value
                for name, value in state.items()
            }
        )

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    def sequence(self, row: int) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids) of sequence `row`."""
        total = int(self.attention_mask[row].sum())
        prompt = total - int(self.response_mask[row].sum())
        ids = self.input_ids[row, :total].tolist()
        return ids[:prompt], ids[prompt:]

    @property
    def lengths(self) -> list[int]:
        """Real tokens of each row."""
        return self.attention_mask.sum(dim=1).tolist()

    @property
    def computed_tokens(self) -> int:
        """Token positions a forward over this batch computes (rows x length, padding too)."""
        return self.input_ids.shape[0] * self.input_ids.shape[1]

    def take(self, rows: list[int]) -> RolloutBatch:
        """Sequences `rows` (in that order), trimmed to their longest real length."""
        index = torch.tensor(rows, dtype=torch.long, device=self.input_ids.device)
        length = int(self.attention_mask[index].sum(dim=1).max())

        def pick(tensor):
            return None if tensor is None else tensor[index, :length]

        return RolloutBatch(
            input_ids=pick(self.input_ids),
            attention_mask=pick(self.attention_mask),
            response_mask=pick(self.response_mask),
            position_ids=pick(self.position_ids),
            example_index=[self.example_index[r] for r in rows],
            responses=[self.responses[r] for r in rows],
            truncated=[self.truncated[r] for r in rows],
            engine_log_probs=pick(self.engine_log_probs),
        )

    def packed(self, rows: list[list[int]]) -> RolloutBatch:
        """Several sequences per row: row i holds the real tokens of sequences rows[i], one
        after another, each with its own position ids (restarting at 0) and segment id, and
        is right-padded to the longest row. The per-sequence lists (example_index, responses,
        truncated) keep one entry per sequence, in packing order. A row's first token is a
        prompt token, so the position before it never reads across sequences."""
        device = self.input_ids.device
        count, length = len(rows), max(sum(self.lengths[s] for s in row) for row in rows)
        shape = (count, length)
        input_ids = torch.zeros(shape, dtype=torch.long, device=device)  # any id: unattended
        attention = torch.zeros(shape, dtype=torch.long, device=device)
        response = torch.zeros(shape, dtype=torch.bool, device=device)
        positions = torch.zeros(shape, dtype=torch.long, device=device)
        segments = torch.zeros(shape, dtype=torch.long, device=device)
        engine = None if self.engine_log_probs is None else torch.zeros(shape, device=device)
        order = []
        for row, members in enumerate(rows):
            offset = 0
            for segment, sequence in enumerate(members, start=1):
                real = self.lengths[sequence]
                span = slice(offset, offset + real)
                input_ids[row, span] = self.input_ids[sequence, :real]
                attention[row, span] = 1
                response[row, span] = self.response_mask[sequence, :real]
                positions[row, span] = torch.arange(real, device=device)
                segments[row, span] = segment
                if engine is not None:
                    engine[row, span] = self.engine_log_probs[sequence, :real]
                offset += real
                order.append(sequence)
        return RolloutBatch(
            input_ids=input_ids,
            attention_mask=attention,
            response_mask=response,
            position_ids=positions,
            example_index=[self.example_index[s] for s in order],
            responses=[self.responses[s] for s in order],
            truncated=[self.truncated[s] for s in order],
            engine_log_probs=engine,
            segment_ids=segments,
        )

    def without_responses(self) -> RolloutBatch:
        """The same rows with nothing to score: a micro-batch that only keeps the ranks'
        forwards and backwards in step (FSDP's collectives), adding nothing to the loss."""
        return dataclasses.replace(self, response_mask=torch.zeros_like(self.response_mask))

    def response_offsets(self) -> torch.Tensor:
        """(B, L-1): for each position whose next token is a response token, how far it is
        from the first such position of its sequence (0 elsewhere)."""
        mask = self.response_mask[:, 1:]
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        if self.segment_ids is None:
            return positions - mask.float().argmax(dim=1, keepdim=True)
        segments = self.segment_ids[:, 1:]
        first = torch.full(
            (mask.shape[0], int(self.segment_ids.max()) + 1), mask.shape[1], device=mask.device
        )
        first = first.scatter_reduce(
            1, segments, torch.where(mask, positions, mask.shape[1]), reduce="amin"
        )
        return torch.where(mask, positions - first.gather(1, segments), 0)

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
