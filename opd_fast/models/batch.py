"""Token sequences laid out for one forward: right-padded to the longest, with explicit position
ids, so that a training forward, an in-process teacher and the teacher server all see exactly
the positions generation saw. The trainer's rollout batches and the server's scorer use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class PaddedTokens(NamedTuple):
    input_ids: torch.Tensor  # (B, L) int64, pad_id after each sequence
    attention_mask: torch.Tensor  # (B, L) int64, 1 on real tokens
    position_ids: torch.Tensor  # (B, L) 0, 1, ... along each sequence; 0 on padding


def right_padded(sequences: Sequence[Sequence[int]], pad_id: int) -> PaddedTokens:
    """B token sequences (lists or int arrays) as (B, L) CPU tensors, L the longest length."""
    length = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)
    return PaddedTokens(input_ids, attention_mask, position_ids)
