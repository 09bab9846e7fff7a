"""Which tokens of a padded (B, L) batch a remote teacher must see, and which it scores.

Both remote teachers (opd-fast's own server and OpenAI-compatible engines) send each sequence's
real tokens up to the last scored position's successor and read one answer per scored position.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


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
