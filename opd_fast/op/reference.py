"""Pure-PyTorch reference of the OPD loss, its gradient and the dynamic metrics.

This file is the readable statement of the math in docs/math.md (token sets, estimators,
metrics, reductions). It favours clarity over speed: token sets are dense (N, V) boolean
masks, every quantity is a full-vocabulary tensor, and gradients come from autograd. The fused
kernels are tested against it.

Shapes: N rows (tokens), V vocabulary entries, k the top-k size.
"""

from __future__ import annotations

import torch

from opd_fast.op.names import (
    ESTIMATORS,
    RENORMALISED_PG_VARIANTS,
    TAIL_COMPLEMENT_LOG_MASS,
    TOKEN_METRIC_NAMES,
    VARIANTS,
)

__all__ = [
    "ESTIMATORS",
    "TOKEN_METRIC_NAMES",
    "VARIANTS",
    "loss_set",
    "opd_loss",
    "opd_loss_rows",
    "reduce_rows",
    "token_metrics",
    "topk_mask",
]


def topk_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Membership mask of the top-k set of each row, ties broken towards the lower token id.

    logits: (N, V) -> bool (N, V) with exactly k True entries per row.
    Everything strictly above the k-th largest value is in; among entries equal to it, the
    lowest ids fill the remaining places. -inf entries enter only when fewer than k are finite.
    """
    kth_value = torch.topk(logits, k, dim=-1).values[:, -1:]
    above = logits > kth_value
    at_threshold = logits == kth_value
    places_left = k - above.sum(dim=-1, keepdim=True)
    rank_among_ties = torch.cumsum(at_threshold.to(torch.int64), dim=-1)
    return above | (at_threshold & (rank_among_ties <= places_left))


def _masked_log_sum(log_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log(sum_{mask} exp(log_values)) per row, -inf for rows with an empty mask.

    Masked entries are replaced before the reduction so no NaN reaches autograd.
    """
    filled = log_values.masked_fill(~mask, float("-inf"))
    row_is_empty = ~torch.isfinite(filled).any(dim=-1, keepdim=True)
    safe = torch.where(row_is_empty, torch.zeros_like(filled), filled)
    return torch.where(row_is_empty[:, 0], float("-inf"), torch.logsumexp(safe, dim=-1))


def _weighted_log_ratio(weight: torch.Tensor, log_q: torch.Tensor, log_p: torch.Tensor):
    """weight * (log_q - log_p), with 0 wherever weight is 0 (so 0 * inf is 0, not NaN)."""
    active = weight > 0
    safe_q = torch.where(active, log_q, torch.zeros_like(log_q))
    safe_p = torch.where(active, log_p, torch.zeros_like(log_p))
    return torch.where(active, weight * (safe_q - safe_p), torch.zeros_like(weight))


def loss_set(variant, student_set, teacher_set, sampled_ids, vocab_size):
    """The set A of a variant (docs/math.md, Variants) as a bool (N, V) mask."""
    if variant == "student_topk":
        return student_set
    if variant == "teacher_topk":
        return teacher_set
    if variant == "overlap_topk":
        return student_set & teacher_set
    if variant == "nonoverlap_topk":
        return student_set ^ teacher_set
    if variant == "union_topk":
        return student_set | teacher_set
    if variant == "full_vocab":
        return torch.ones_like(student_set)
    if variant == "sampled_token":
        return torch.nn.functional.one_hot(sampled_ids, vocab_size).bool()
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


def _pg_loss_rows(variant, in_set, log_p, log_q):
    """Policy-gradient surrogate (docs/math.md, Estimators: pg): the value is -sum A_t(v);
    the gradient is (1/tau) * (C p_j - c_j 1[j in A]), which autograd produces from
    -sum c_v log p_v."""
    p = log_p.detach().exp()
    if variant == "sampled_token":  # w = 1: the sampled token always counts
        advantage = torch.where(in_set, log_q - log_p.detach(), torch.zeros_like(log_q))
    else:
        if variant in RENORMALISED_PG_VARIANTS:
            # p / sum_A p in log space: the mass of A underflows in fp32 for a confident model.
            log_set_mass = _masked_log_sum(log_p.detach(), in_set).unsqueeze(-1)
            renormalised = (log_p.detach() - log_set_mass).exp()
            weight = torch.where(in_set & torch.isfinite(log_set_mass), renormalised, 0.0)
        else:  # nonoverlap_topk and full_vocab use raw probabilities
            weight = p * in_set
        advantage = _weighted_log_ratio(weight, log_q, log_p.detach())
    value = -advantage.sum(dim=-1)
    with_grad = advantage != 0
    safe_log_p = torch.where(with_grad, log_p, torch.zeros_like(log_p))
    surrogate = -(advantage * safe_log_p).sum(dim=-1)
    return value + (surrogate - surrogate.detach())


def _exact_loss_rows(in_set, log_p, log_q):
    """Renormalised subset reverse KL (docs/math.md, Estimators: exact):
    sum_A pbar (log pbar - log qbar)."""
    log_p_bar = log_p - _masked_log_sum(log_p, in_set).unsqueeze(-1)
    log_q_bar = log_q - _masked_log_sum(log_q, in_set).unsqueeze(-1)
    active = in_set & torch.isfinite(log_p_bar)
    safe_log_p_bar = torch.where(active, log_p_bar, torch.zeros_like(log_p_bar))
    safe_log_q_bar = torch.where(active, log_q_bar, torch.zeros_like(log_q_bar))
    p_bar = torch.where(active, safe_log_p_bar.exp(), torch.zeros_like(log_p_bar))
    return (p_bar * (safe_log_p_bar - safe_log_q_bar)).sum(dim=-1)


def _log1m_exp(log_mass: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for log-masses x <= 0 (expm1 above -ln 2, log1p below); -inf where the
    mass rounded to >= 1."""
    x = log_mass.clamp_max(0)
    near_one = x > -0.6931471805599453
    away = torch.log1p(-torch.where(near_one, torch.full_like(x, -1.0), x).exp())
    close = torch.log(-torch.expm1(torch.where(near_one, x, torch.full_like(x, -1.0))))
    return torch.where(near_one, close, away)


def _tail_log_mass(log_values: torch.Tensor, in_set: torch.Tensor) -> torch.Tensor:
    """log(1 - sum_A exp(log_values)) per row: log1p(-mass) while A holds at most 15/16 of the
    mass (its rounding then cancels against that of the terms of A), else a log-sum-exp over
    the complement (where 1 - mass would lose its digits)."""
    log_set = _masked_log_sum(log_values, in_set)
    use_rest = log_set.detach() > TAIL_COMPLEMENT_LOG_MASS
    # The branch not taken gets a harmless input: torch.where passes 0 * its gradient back.
    from_set = _log1m_exp(torch.where(use_rest, torch.full_like(log_set, -1.0), log_set))
    from_rest = _masked_log_sum(log_values, ~in_set)
    return torch.where(use_rest, from_rest, from_set)


def _tail_loss_rows(in_set, log_p, log_q):
    """Reverse KL of the |A|+1 categories "v in A" and "the rest" (docs/math.md, Estimators:
    tail): sum_A p (log p - log q) + P (log P - log Q), P = 1 - sum_A p, Q = 1 - sum_A q, with
    the full-vocabulary p and q. Autograd gives the gradient through every logit."""
    active = in_set & (log_p.detach() > float("-inf"))
    safe_log_p = torch.where(active, log_p, torch.zeros_like(log_p))
    safe_log_q = torch.where(active, log_q, torch.zeros_like(log_q))
    p = torch.where(active, safe_log_p.exp(), torch.zeros_like(log_p))
    in_set_part = (p * (safe_log_p - safe_log_q)).sum(dim=-1)
    log_tail_p = _tail_log_mass(log_p, in_set)
    log_tail_q = _tail_log_mass(log_q, in_set)
    has_tail = log_tail_p.detach() > float("-inf")
    safe_tail_p = torch.where(has_tail, log_tail_p, torch.zeros_like(log_tail_p))
    safe_tail_q = torch.where(has_tail, log_tail_q, torch.zeros_like(log_tail_q))
    tail_part = torch.where(has_tail, safe_tail_p.exp() * (safe_tail_p - safe_tail_q), 0.0)
    return in_set_part + tail_part


def _entropy(log_probs: torch.Tensor) -> torch.Tensor:
    probs = log_probs.exp()
    return -torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs)).sum(dim=-1)


@torch.no_grad()
def token_metrics(student_set, teacher_set, log_p, log_q, k, sampled_ids=None):
    """Every per-token metric (docs/math.md, Metrics) as a dict of (N,) tensors."""
    p, q = log_p.exp(), log_q.exp()
    overlap = student_set & teacher_set
    overlap_count = overlap.sum(dim=-1)
    log_p_til = log_p - _masked_log_sum(log_p, overlap).unsqueeze(-1)
    log_q_til = log_q - _masked_log_sum(log_q, overlap).unsqueeze(-1)
    p_til = torch.where(overlap, log_p_til.exp(), torch.zeros_like(p))
    overlap_advantage = _weighted_log_ratio(p_til, log_q_til, log_p_til).sum(dim=-1)
    overlap_advantage = torch.where(
        overlap_count > 0, overlap_advantage / overlap_count.clamp_min(1), float("nan")
    )
    entropy_student, entropy_teacher = _entropy(log_p), _entropy(log_q)
    metrics = {
        "overlap_ratio": overlap_count.to(p.dtype) / k,
        "overlap_mass_student": (p * overlap).sum(dim=-1),
        "overlap_mass_teacher": (q * overlap).sum(dim=-1),
        "overlap_token_advantage": overlap_advantage,
        "entropy_student": entropy_student,
        "entropy_teacher": entropy_teacher,
        "entropy_gap": (entropy_teacher - entropy_student).abs(),
        "student_topk_mass": (p * student_set).sum(dim=-1),
        "teacher_topk_mass": (q * teacher_set).sum(dim=-1),
    }
    if sampled_ids is not None:
        rows = torch.arange(log_p.shape[0], device=log_p.device)
        metrics["sampled_token_kl"] = log_p[rows, sampled_ids] - log_q[rows, sampled_ids]
    return metrics


def opd_loss_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    k: int = 16,
    variant: str = "student_topk",
    estimator: str = "pg",
    temperature: float = 1.0,
    sampled_ids: torch.Tensor | None = None,
):
    """Per-token loss L_t and per-token metrics.

    student_logits, teacher_logits: (N, V); sampled_ids: (N,) int64.
    Returns (loss_rows (N,) differentiable w.r.t. student_logits, dict of (N,) metrics).
    Computes in fp32 (fp64 for fp64 inputs).
    """
    compute_dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    student = student_logits.to(compute_dtype)
    teacher = teacher_logits.to(compute_dtype)
    # Sets are ranked on the raw logits: the order is the same at every temperature.
    student_set = topk_mask(student.detach(), k)
    teacher_set = topk_mask(teacher, k)
    log_p = torch.log_softmax(student / temperature, dim=-1)
    log_q = torch.log_softmax(teacher / temperature, dim=-1)
    in_set = loss_set(variant, student_set, teacher_set, sampled_ids, student.shape[-1])
    if estimator == "pg":
        loss_rows = _pg_loss_rows(variant, in_set, log_p, log_q)
    elif estimator == "exact":
        if variant == "sampled_token":
            raise ValueError("estimator='exact' has no form for variant='sampled_token'")
        loss_rows = _exact_loss_rows(in_set, log_p, log_q)
    elif estimator == "tail":
        loss_rows = _tail_loss_rows(in_set, log_p, log_q)
    else:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
    metrics = token_metrics(student_set, teacher_set, log_p, log_q, k, sampled_ids)
    return loss_rows, metrics


def reduce_rows(loss_rows, valid, reduction, batch_shape, token_weights=None):
    """Aggregate per-token losses (docs/math.md, Reductions).

    valid: bool (N,) of tokens that count; batch_shape: (B, T) or (N,); token_weights: None or
    weights shaped like the leading dims, multiplying each valid token's loss (constants).
    Written apart from opd_fast.op.reductions, so the tests compare two implementations.
    """
    per_token = torch.where(valid, loss_rows, torch.zeros_like(loss_rows)).reshape(batch_shape)
    if token_weights is not None:
        per_token = per_token * token_weights.detach().reshape(batch_shape).to(per_token.dtype)
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    if reduction == "token_mean":
        return per_token.sum() / max(int(valid.sum()), 1)
    if reduction == "seq_mean_token_sum":
        if len(batch_shape) != 2:
            raise ValueError("reduction='seq_mean_token_sum' needs (B, T, V) logits")
        return per_token.sum(dim=-1).mean()
    raise ValueError(
        f"unknown reduction {reduction!r}; expected token_mean, seq_mean_token_sum, sum or none"
    )


def opd_loss(
    student_logits,
    teacher_logits,
    *,
    k=16,
    variant="student_topk",
    estimator="pg",
    temperature=1.0,
    mask=None,
    sampled_ids=None,
    reduction="token_mean",
    token_weights=None,
):
    """Reference counterpart of opd_fast.opd_loss: (loss, dict of per-token metrics (N,), valid).

    Logits (N, V) or (B, T, V); mask (B, T) or (N,); sampled_ids shaped like the leading dims.
    """
    batch_shape = tuple(student_logits.shape[:-1])
    vocab = student_logits.shape[-1]
    flat_ids = None if sampled_ids is None else sampled_ids.reshape(-1)
    loss_rows, metrics = opd_loss_rows(
        student_logits.reshape(-1, vocab),
        teacher_logits.reshape(-1, vocab),
        k=k,
        variant=variant,
        estimator=estimator,
        temperature=temperature,
        sampled_ids=flat_ids,
    )
    if mask is None:
        valid = torch.ones(loss_rows.shape[0], dtype=torch.bool, device=loss_rows.device)
    else:
        valid = mask.reshape(-1).bool()
    loss = reduce_rows(loss_rows, valid, reduction, batch_shape, token_weights)
    return loss, metrics, valid


def linear_logits(hidden, weight, bias=None, vocab=None):
    """hidden (..., H) @ weight[:vocab].T (+ bias[:vocab]) -> (..., vocab): the logits that
    opd_fast.linear_opd_loss never materialises whole."""
    vocab = weight.shape[0] if vocab is None else vocab
    logits = hidden @ weight[:vocab].T
    return logits if bias is None else logits + bias[:vocab]


def linear_opd_loss(student_hidden, student_weight, teacher_logits, *, student_bias=None,
                    vocab=None, **settings):  # fmt: skip
    """Reference counterpart of opd_fast.linear_opd_loss: the materialised logits through
    opd_loss above (teacher_logits: (..., vocab); build a linear teacher's with linear_logits)."""
    logits = linear_logits(student_hidden, student_weight, student_bias, vocab)
    return opd_loss(logits, teacher_logits, **settings)
