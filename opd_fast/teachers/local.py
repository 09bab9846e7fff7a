"""LocalTeacher: the frozen teacher model in this process.

It runs the model in chunks of `batch_size` sequences so its memory stays bounded. Asked for
hidden states (the fused linear loss path), it answers with its final hidden states and its
output layer, a LinearTeacher, so its (B, T, V) logits never exist; otherwise (or when its
logits are not a linear layer of its hidden states) with the logits at the scored positions,
sliced to the shared vocabulary. Every variant, full_vocab included, is exact.
"""

from __future__ import annotations

import torch

from opd_fast.models.output_layer import last_hidden_states, nonlinear_head_reason, output_layer
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

    @property
    def local_model(self) -> torch.nn.Module:
        return self.model

    def score(self, request: ScoreRequest) -> torch.Tensor | LinearTeacher:
        """Position t predicts token t + 1: (B, L-1, ...) rows in request.dtype."""
        if request.answer_form == HIDDEN_STATES and self.linear_head_reason is None:
            return self.linear_teacher(
                request.input_ids, request.attention_mask, request.position_ids, request.dtype
            )
        logits = self.logits(request.input_ids, request.attention_mask, request.position_ids)
        return logits[:, :-1, : request.vocab].to(request.dtype)

    @torch.no_grad()
    def linear_teacher(self, input_ids, attention_mask, position_ids, dtype) -> LinearTeacher:
        """(B, L) ids -> LinearTeacher of the (B, L-1, H) hidden states at the scored positions
        and the output layer, in `dtype`."""
        chunks = [
            last_hidden_states(self.model, *rows)[:, :-1]
            for rows in self._chunks(input_ids, attention_mask, position_ids)
        ]
        hidden = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        weight, bias = output_layer(self.model)
        return LinearTeacher(
            hidden.to(dtype),
            weight.detach().to(dtype),
            None if bias is None else bias.detach().to(dtype),
        )

    @torch.no_grad()
    def logits(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        """(B, L) ids -> (B, L, V) logits, no gradient."""
        chunks = [
            self.model(
                input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False
            ).logits
            for ids, attention, positions in self._chunks(input_ids, attention_mask, position_ids)
        ]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def _chunks(self, *tensors):
        """The (B, ...) tensors' rows, batch_size sequences at a time."""
        for start in range(0, tensors[0].shape[0], self.batch_size):
            yield tuple(tensor[start : start + self.batch_size] for tensor in tensors)
