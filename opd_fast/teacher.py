"""The frozen teacher: scores every position of student rollouts without gradients.

A Teacher returns logits for a batch of sequences; the trainer slices the response positions
and feeds them to the fused loss. LocalTeacher runs a model in this process, in chunks of
`batch_size` sequences so its memory stays bounded. A remote teacher implements the same
interface over HTTP (opd_fast.serving).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Teacher(Protocol):
    vocab_size: int

    def logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """(B, L) ids -> (B, L, V) logits, no gradient."""


@runtime_checkable
class PayloadTeacher(Protocol):
    """A teacher that answers with OPD_SPEC.md section 6 payloads instead of logits (a remote
    server): every variant but full_vocab, exactly."""

    vocab_size: int

    def payload(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor,
        requested_ids: torch.Tensor,
        k: int,
        temperature: float,
        vocab_limit: int,
    ):
        """Score sequences (B, L); for every position t < L - 1 where response_mask (B, L-1)
        is True, describe the teacher's next-token distribution over ids < vocab_limit at
        temperature: a TeacherPayload shaped (B, L-1, ...), requested_ids (B, L-1, k) being
        the student's top-k there, sampled = input_ids[:, 1:]. Other positions: any finite
        filler (they are masked out)."""


class LocalTeacher:
    def __init__(self, model: torch.nn.Module, batch_size: int):
        self.model = model
        self.batch_size = batch_size
        self.vocab_size = model.get_output_embeddings().weight.shape[0]

    @torch.no_grad()
    def logits(self, input_ids, attention_mask, position_ids):
        chunks = []
        for start in range(0, input_ids.shape[0], self.batch_size):
            end = start + self.batch_size
            output = self.model(
                input_ids=input_ids[start:end],
                attention_mask=attention_mask[start:end],
                position_ids=position_ids[start:end],
                use_cache=False,
            )
            chunks.append(output.logits)
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)
