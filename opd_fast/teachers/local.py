"""LocalTeacher: the frozen teacher model in this process, scoring with full logits.

It runs the model in chunks of `batch_size` sequences so its memory stays bounded, and
returns the logits at the scored positions, sliced to the shared vocabulary: every variant,
full_vocab included, is exact. For the fused linear loss it returns instead its final hidden
states with its output layer (`linear_teacher`), so its (B, T, V) logits never exist.
"""

from __future__ import annotations

import torch

from opd_fast.models.output_layer import last_hidden_states, nonlinear_head_reason, output_layer
from opd_fast.models.vocabulary import output_rows
from opd_fast.op.linear import LinearTeacher
from opd_fast.op.names import VARIANTS
from opd_fast.teachers.base import LOGITS, ScoreRequest


class LocalTeacher:
    returns = LOGITS
    variants = VARIANTS

    def __init__(self, model: torch.nn.Module, batch_size: int):
        self.model = model
        self.batch_size = batch_size
        self.vocab_size = output_rows(model)

    @property
    def local_model(self) -> torch.nn.Module:
        return self.model

    @property
    def linear_head_reason(self) -> str | None:
        """Why linear_teacher cannot stand for the logits (None: it can)."""
        return nonlinear_head_reason(self.model)

    @torch.no_grad()
    def linear_teacher(self, input_ids, attention_mask, position_ids, dtype) -> LinearTeacher:
        """(B, L) ids -> LinearTeacher of the (B, L-1, H) hidden states at the scored positions
        (position t predicts token t + 1) and the output layer, in `dtype`."""
        chunks = []
        for start in range(0, input_ids.shape[0], self.batch_size):
            end = start + self.batch_size
            hidden = last_hidden_states(
                self.model, input_ids[start:end], attention_mask[start:end], position_ids[start:end]
            )
            chunks.append(hidden[:, :-1])
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

    def score(self, request: ScoreRequest) -> torch.Tensor:
        """(B, L-1, vocab) logits in the student's dtype: position t predicts token t + 1."""
        logits = self.logits(request.input_ids, request.attention_mask, request.position_ids)
        return logits[:, :-1, : request.vocab].to(request.student_logits.dtype)
