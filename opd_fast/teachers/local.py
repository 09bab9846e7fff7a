"""LocalTeacher: the frozen teacher model in this process.

It runs the model in chunks of `batch_size` sequences so its memory stays bounded. Asked for
hidden states (the fused linear loss path), it answers with its final hidden states and its
output layer, a LinearTeacher, so its (B, T, V) logits never exist; otherwise (or when its
logits are not a linear layer of its hidden states) with the logits at the scored positions,
sliced to the shared vocabulary. Every variant, full_vocab included, is exact.

A teacher sharded over the ranks with FSDP2 (teacher_sharding: shard) answers the same: its
forwards gather each layer in turn, and its output layer is gathered once and kept (it is
frozen), so the loss can read it after the forward has resharded the rest.
"""

from __future__ import annotations

import torch

from opd_fast.models.batch import packed_attention
from opd_fast.models.output_layer import (
    has_root_call,
    last_hidden_states,
    nonlinear_head_reason,
    output_layer,
    with_root_parameters,
)
from opd_fast.models.vocabulary import output_rows
from opd_fast.op.linear import LinearTeacher
from opd_fast.op.names import VARIANTS
from opd_fast.teachers.base import HIDDEN_STATES, ScoreRequest


class LocalTeacher:
    variants = VARIANTS
    needs_student_topk = False

    def __init__(self, model: torch.nn.Module, batch_size: int):
        self.model = model
        self.batch_size = batch_size
        self.vocab_size = output_rows(model)
        # Why hidden states cannot stand for the logits (None: they can).
        self.linear_head_reason = nonlinear_head_reason(model)
        self._gathered_output_layer = None  # a sharded teacher's, gathered on first use

    @property
    def local_model(self) -> torch.nn.Module:
        return self.model

    def score(self, request: ScoreRequest) -> torch.Tensor | LinearTeacher:
        """Position t predicts token t + 1: (B, L-1, ...) rows in request.dtype."""
        rows = (request.input_ids, request.attention_mask, request.position_ids)
        if request.answer_form == HIDDEN_STATES and self.linear_head_reason is None:
            return self.linear_teacher(*rows, request.dtype, request.segment_ids)
        logits = self.logits(*rows, request.segment_ids)
        return logits[:, :-1, : request.vocab].to(request.dtype)

    @torch.no_grad()
    def linear_teacher(
        self, input_ids, attention_mask, position_ids, dtype, segment_ids=None
    ) -> LinearTeacher:
        """(B, L) ids -> LinearTeacher of the (B, L-1, H) hidden states at the scored positions
        and the output layer, in `dtype`. segment_ids: rows packing several sequences."""
        chunks = [
            with_root_parameters(self.model, last_hidden_states, ids, attention, positions)[:, :-1]
            for ids, attention, positions in self._chunks(
                input_ids, attention_mask, position_ids, segment_ids
            )
        ]
        hidden = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        weight, bias = self._output_layer()
        return LinearTeacher(
            hidden.to(dtype),
            weight.detach().to(dtype),
            None if bias is None else bias.detach().to(dtype),
        )

    @torch.no_grad()
    def logits(self, input_ids, attention_mask, position_ids, segment_ids=None) -> torch.Tensor:
        """(B, L) ids -> (B, L, V) logits, no gradient. segment_ids: rows packing several
        sequences."""
        chunks = [
            self.model(
                input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False
            ).logits
            for ids, attention, positions in self._chunks(
                input_ids, attention_mask, position_ids, segment_ids
            )
        ]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def _output_layer(self):
        """(weight, bias) of the output layer: the parameters themselves, or a sharded
        teacher's gathered copy (kept: the teacher is frozen)."""
        if not has_root_call(self.model):
            return output_layer(self.model)
        if self._gathered_output_layer is None:
            self._gathered_output_layer = with_root_parameters(
                self.model,
                lambda model: tuple(
                    None if t is None else t.detach().clone() for t in output_layer(model)
                ),
            )
        return self._gathered_output_layer

    def _chunks(self, input_ids, attention_mask, position_ids, segment_ids):
        """(ids, what the model takes as attention_mask, position ids), batch_size rows at a
        time."""
        for start in range(0, input_ids.shape[0], self.batch_size):
            rows = slice(start, start + self.batch_size)
            segments = None if segment_ids is None else segment_ids[rows]
            attention = packed_attention(self.model, attention_mask[rows], segments)
            yield input_ids[rows], attention, position_ids[rows]
