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


def packed_attention(model, attention_mask: torch.Tensor, segment_ids: torch.Tensor | None):
    """What to pass `model` as attention_mask for rows that may hold several sequences.

    segment_ids (B, L): 1, 2, ... for the sequences packed in a row, 0 on its padding; None:
    one sequence per row, and attention_mask (B, L) is passed as it is. Packed rows need each
    token to attend only to earlier tokens of its own sequence: SDPA takes a (B, 1, L, L)
    boolean mask of that, eager attention the same as an additive float mask, and
    flash-attention 2 reads the sequence boundaries from the restarting position ids (no mask).
    """
    if segment_ids is None:
        return attention_mask
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation == "flash_attention_2":
        return None
    if implementation not in ("sdpa", "eager"):
        raise ValueError(
            f"packed rows need sdpa, eager or flash_attention_2 attention; the model uses "
            f"{implementation!r}"
        )
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
    allowed = allowed[:, None]  # (B, 1, L, L); padding attends to padding: no empty row
    if implementation == "sdpa":
        return allowed
    blocked = torch.finfo(torch.float32).min
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, blocked)
