"""The off-policy gap between the rollout engine and the trainer, and its optional correction.

An engine samples token y_t with log-prob log pi_engine(y_t) (its own copy of the weights, its
own kernels, its own sampling transforms: temperature, top-p, the vocabulary limit). The
trainer reads the same token at log pi_train(y_t) = log_softmax(z_t / tau)[y_t], z_t its logits
over the shared vocabulary, tau the rollout temperature. With identical weights and no top-p the
two agree to rounding; the gap |log pi_train - log pi_engine| is logged every step (mean and
max over response tokens). Truncated importance sampling (the RL frameworks' "TIS") corrects
what remains: each token's loss is weighted by min(pi_train / pi_engine, C), the weight
detached (it rescales the gradient, it is not trained through); the weights reach the loss as
its token weights.
"""

from __future__ import annotations

import torch

from opd_fast.op.kernels import row_topk
from opd_fast.op.linear import for_logit_chunks


def sampled_log_probs(
    logits: torch.Tensor, sampled_ids: torch.Tensor, temperature: float
) -> torch.Tensor:
    """log_softmax(logits / temperature) at sampled_ids, in fp32, without a gradient.

    logits: (B, T, V) (any row stride: the trainer's are a view past padded columns);
    sampled_ids: (B, T) ids < V. Returns (B, T) float32. The log-partition comes from the
    fused row_topk pass, one sequence at a time: no (B, T, V) temporary.
    """
    with torch.no_grad():
        lse = torch.stack([row_topk(rows, 1, temperature).lse for rows in logits.unbind(0)])
        picked = logits.gather(-1, sampled_ids.unsqueeze(-1)).squeeze(-1).float()
        return picked / temperature - lse.float()


def sampled_log_probs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    vocab: int,
    sampled_ids: torch.Tensor,
    temperature: float,
    chunk_bytes: int = 256 * 2**20,
) -> torch.Tensor:
    """sampled_log_probs of the logits hidden @ weight[:vocab].T (+ bias), formed a chunk of
    tokens at a time (the fused_linear loss path never holds (B, T, V) logits).

    hidden: (B, T, H); sampled_ids: (B, T). Returns (B, T) float32.
    """
    rows, ids = hidden.reshape(-1, hidden.shape[-1]), sampled_ids.reshape(-1)
    chunk = max(1, chunk_bytes // (vocab * hidden.element_size()))  # the chunk's logits
    out = torch.empty(ids.shape, dtype=torch.float32, device=hidden.device)

    def log_probs(start, end, logits):
        out[start:end] = sampled_log_probs(logits[None], ids[None, start:end], temperature)[0]

    for_logit_chunks(rows, weight, bias, vocab, chunk, log_probs)
    return out.reshape(sampled_ids.shape)


def truncated_is_weights(
    train_log_probs: torch.Tensor, engine_log_probs: torch.Tensor, cap: float
) -> torch.Tensor:
    """min(exp(train - engine), cap), elementwise, detached. Both (B, T); cap > 0."""
    if cap <= 0:
        raise ValueError(f"the importance-weight cap must be > 0, got {cap}")
    ratio = torch.exp((train_log_probs - engine_log_probs).detach().float())
    return ratio.clamp(max=cap)


class OffPolicyGap:
    """Accumulates |log pi_train - log pi_engine| (and the IS weights, when used) over the
    micro-batches of a step."""

    def __init__(self):
        self.total, self.count, self.largest = 0.0, 0, 0.0
        self.weight_total, self.weight_count, self.capped = 0.0, 0, 0

    def add(
        self,
        train_log_probs: torch.Tensor,
        engine_log_probs: torch.Tensor,
        mask: torch.Tensor,
        weights: torch.Tensor | None = None,
        cap: float | None = None,
    ) -> None:
        valid = mask.bool()
        gap = (train_log_probs.float() - engine_log_probs.float()).abs()[valid]
        if gap.numel():
            self.total += float(gap.sum())
            self.count += gap.numel()
            self.largest = max(self.largest, float(gap.max()))
        if weights is not None:
            used = weights[valid]
            self.weight_total += float(used.sum())
            self.weight_count += used.numel()
            self.capped += int((used >= cap).sum()) if cap is not None else 0

    def means(self) -> dict:
        """The step's metrics (empty when no engine log-probs were seen)."""
        if not self.count:
            return {}
        record = {
            "rollout_logprob_gap_mean": self.total / self.count,
            "rollout_logprob_gap_max": self.largest,
        }
        if self.weight_count:
            record["rollout_is_weight_mean"] = self.weight_total / self.weight_count
            record["rollout_is_capped_fraction"] = self.capped / self.weight_count
        return record
