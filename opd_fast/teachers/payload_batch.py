"""A padded (B, L) batch scored by a teacher in another process: which tokens it must see, and
the (B, L-1, ...) payload arrays its answers fill.

Both remote teachers (opd-fast's own server and OpenAI-compatible engines) send each sequence's
real tokens up to the last scored position's successor and read one answer per scored position.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from opd_fast.op.payload import TeacherPayload


class ScoredSpan(NamedTuple):
    row: int  # sequence in the batch
    begin: int  # first real token sent
    end: int  # one past the last token sent (the last scored position's successor)
    first: int  # first scored position (scored positions are first .. end - 2)


def scored_spans(attention: np.ndarray, response_mask: np.ndarray) -> list[ScoredSpan]:
    """Spans of rows with at least one scored position. attention (B, L) marks real tokens (one
    contiguous run per row); response_mask (B, L-1) the positions to score."""
    spans = []
    for row in range(attention.shape[0]):
        scored = np.flatnonzero(response_mask[row])
        if scored.size == 0:
            continue
        real = np.flatnonzero(attention[row])
        begin, end = int(real[0]), int(real[-1]) + 1
        if real.size != end - begin:
            raise ValueError(f"payload: row {row}'s attention_mask is not one contiguous run")
        first, last = int(scored[0]), int(scored[-1])
        if first < begin or last + 2 > end:
            raise ValueError(
                f"payload: row {row} scores positions {first}..{last} outside its tokens "
                f"{begin}..{end - 1}"
            )
        spans.append(ScoredSpan(row, begin, last + 2, first))
    return spans


class PayloadBatch:
    """One payload call's inputs on the host, and the answer arrays to fill.

    ids (B, L) and requested (B, L-1, k) as numpy; spans: what to send. Positions no span
    scores keep finite filler (the loss masks them out); `unknown` fills what a teacher may
    leave unanswered (NaN where it cannot tell: the entropy and log-probs at ids an engine
    did not return, docs/math.md).
    """

    def __init__(
        self,
        input_ids,
        attention_mask,
        response_mask,
        requested_ids,
        k: int,
        *,
        dtype=np.float32,
        unknown: float = 0.0,
    ):
        self.device = input_ids.device
        self.ids = input_ids.detach().cpu().numpy()
        attention = attention_mask.detach().cpu().numpy().astype(bool)
        mask = response_mask.detach().cpu().numpy().astype(bool)
        self.requested = requested_ids.detach().cpu()
        positions = (self.ids.shape[0], self.ids.shape[1] - 1)  # (B, L-1)
        if mask.shape != positions or tuple(self.requested.shape) != positions + (k,):
            raise ValueError(
                f"payload: expected response_mask {positions} and requested_ids "
                f"{positions + (k,)}, got {mask.shape} and {tuple(self.requested.shape)}"
            )
        self.spans = scored_spans(attention, mask)
        self.topk_ids = self.requested.numpy().copy()  # filler: valid ids
        self.topk_log_probs = np.zeros(positions + (k,), dtype)
        self.requested_log_probs = np.full(positions + (k,), unknown, dtype)
        self.sampled_log_probs = np.zeros(positions, dtype)
        self.entropy = np.full(positions, unknown, dtype)

    def sequence(self, span: ScoredSpan) -> np.ndarray:
        """The tokens of `span` to send."""
        return self.ids[span.row, span.begin : span.end]

    def fill(self, row: int, positions, **answers: np.ndarray) -> None:
        """Store answers (topk_ids, topk_log_probs, requested_log_probs, sampled_log_probs,
        entropy; any subset) at positions (an index or a slice) of sequence `row`."""
        for name, values in answers.items():
            getattr(self, name)[row, positions] = values

    def payload(self) -> TeacherPayload:
        return TeacherPayload(
            topk_ids=torch.from_numpy(self.topk_ids.astype(np.int64)),
            topk_log_probs=torch.from_numpy(self.topk_log_probs),
            requested_ids=self.requested,
            requested_log_probs=torch.from_numpy(self.requested_log_probs),
            entropy=torch.from_numpy(self.entropy),
            sampled_log_probs=torch.from_numpy(self.sampled_log_probs),
        ).map(lambda tensor: tensor.to(self.device))
