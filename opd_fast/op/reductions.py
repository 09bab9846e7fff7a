"""From per-token rows to what a caller sees: the loss's reductions (docs/math.md, Reductions)
and the row weights they stand for, the metric means over valid tokens, the per-token metrics,
and the normalisation of a batch that is reduced in parts (micro-batches, ranks).

`opd_loss`, `linear_opd_loss` and the trainer use this module; `opd_fast.op.reference` keeps
its own independent version, so the tests compare two implementations.

Token weights (e.g. truncated importance-sampling weights) multiply each token's loss before
the reduction: they are constants (no gradient flows into them) and they do not change the
denominator of `token_mean` (the count of valid tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_fast.op.names import REDUCTIONS, TOKEN_METRIC_NAMES

# Reductions whose value is a scalar (their gradient is a fixed weight per row).
SCALAR_REDUCTIONS = tuple(r for r in REDUCTIONS if r != "none")


def valid_rows(mask: torch.Tensor | None, rows: int, device) -> torch.Tensor:
    """(rows,) bool: the tokens that count (all of them without a mask)."""
    if mask is None:
        return torch.ones(rows, dtype=torch.bool, device=device)
    return mask.reshape(-1).bool()


def _weighted(rows: torch.Tensor, token_weights: torch.Tensor | None) -> torch.Tensor:
    if token_weights is None:
        return rows
    return rows * token_weights.reshape(-1).detach().to(rows.dtype)


def reduce_rows(
    loss_rows: torch.Tensor,
    valid: torch.Tensor,
    reduction: str,
    batch_shape: tuple[int, ...],
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Aggregate per-token losses (N,) over the valid tokens (N,) bool.

    batch_shape: (B, T) or (N,); seq_mean_token_sum needs (B, T). token_weights: (N,) or
    batch_shape, multiplying each token's loss.
    """
    masked = _weighted(torch.where(valid, loss_rows, torch.zeros_like(loss_rows)), token_weights)
    if reduction == "token_mean":
        return masked.sum() / valid.to(loss_rows.dtype).sum().clamp_min(1)
    if reduction == "seq_mean_token_sum":
        return masked.reshape(batch_shape).sum(dim=-1).mean()
    if reduction == "sum":
        return masked.sum()
    if reduction == "none":
        return masked.reshape(batch_shape)
    raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")


def row_weights(
    valid: torch.Tensor,
    reduction: str,
    batch_shape: tuple[int, ...],
    dtype: torch.dtype,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """d reduce_rows(...) / d loss_rows for a scalar reduction: (N,) in `dtype`, zero where
    not valid. What the fused linear op folds into the gradient it computes in the forward."""
    weights = _weighted(valid.to(dtype), token_weights)
    if reduction == "token_mean":
        return weights / valid.to(dtype).sum().clamp_min(1)
    if reduction == "seq_mean_token_sum":
        return weights / batch_shape[0]
    if reduction == "sum":
        return weights
    raise ValueError(f"row weights exist for {SCALAR_REDUCTIONS}, not for {reduction!r}")


def metric_names(sampled_given: bool) -> list[tuple[int, str]]:
    """(column, name) of the per-token metric rows; sampled_token_kl needs the sampled ids."""
    return [
        (index, name)
        for index, name in enumerate(TOKEN_METRIC_NAMES)
        if sampled_given or name != "sampled_token_kl"
    ]


def mean_metrics(
    metric_rows: torch.Tensor, valid: torch.Tensor, sampled_given: bool
) -> dict[str, torch.Tensor]:
    """Means of the metric rows (N, M) over valid tokens, as 0-dim fp32 tensors (no host sync);
    overlap_token_advantage skips the rows with an empty overlap (NaN there), and
    `overlap_empty_rows` counts them. Adds `num_tokens`."""
    weights = valid.to(metric_rows.dtype)
    count = weights.sum()
    denominator = count.clamp_min(1)
    means = {}
    for index, name in metric_names(sampled_given):
        column = metric_rows[:, index]
        if name == "overlap_token_advantage":
            defined = valid & ~torch.isnan(column)
            total = torch.where(defined, column, torch.zeros_like(column)).sum()
            defined_count = defined.to(column.dtype).sum()
            means[name] = (total / defined_count.clamp_min(1)).float()
            means["overlap_empty_rows"] = (count - defined_count).float()
        else:
            means[name] = ((column * weights).sum() / denominator).float()
    means["num_tokens"] = count.float()
    return means


def per_token_metrics(
    loss_rows: torch.Tensor,
    metric_rows: torch.Tensor,
    batch_shape: tuple[int, ...],
    sampled_given: bool,
) -> dict[str, torch.Tensor]:
    """The per-token loss and metrics, each shaped batch_shape (return_token_metrics=True)."""
    token_metrics = {"loss": loss_rows.detach().reshape(batch_shape)}
    for index, name in metric_names(sampled_given):
        token_metrics[name] = metric_rows[:, index].reshape(batch_shape)
    return token_metrics


@dataclass(frozen=True)
class SplitReduction:
    """A reduction of one batch computed in parts (micro-batches, and ranks): each part's loss
    is reduced with `part_reduction` (a sum over its tokens), then `scale` makes the parts add
    up to the reduction of the whole batch. Both reductions are a sum over tokens divided by
    a count of the whole batch (its valid tokens, or its sequences), so the parts may group
    tokens any way: by sequences, by length, or several sequences packed in a row.
    tokens, sequences: the whole batch's valid tokens and sequences."""

    reduction: str  # token_mean | seq_mean_token_sum
    tokens: int
    sequences: int

    def __post_init__(self):
        if self.reduction not in ("token_mean", "seq_mean_token_sum"):
            raise ValueError(
                f"a split reduction is token_mean or seq_mean_token_sum, got {self.reduction!r}"
            )

    part_reduction = "sum"

    def scale(self, part_loss: torch.Tensor) -> torch.Tensor:
        """A part's loss (reduced by part_reduction) as its share of the whole batch's."""
        if self.reduction == "token_mean":
            return part_loss / max(self.tokens, 1)
        return part_loss / max(self.sequences, 1)
