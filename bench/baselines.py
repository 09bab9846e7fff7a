"""The careful eager PyTorch OPD loss: what a user who writes it well gets without the fused op.

One function, `careful_opd_loss`, for every variant and estimator `opd_fast.opd_loss` supports
(docs/math.md), written the way a careful user would: one log-softmax per model where the loss
needs full-vocabulary log-probs, `torch.topk` for the sets, and everything else on gathered
(N, m) tensors, m <= 2k. The benchmark (`bench_opd.py`, `test_bench_opd.py`) compares the op
with it and with `torch.compile` of it; `python_tests/test_baselines.py` holds it to the op's
loss and gradient, so the comparison is like with like.

What it leaves out, in the baseline's favour: the op also computes every metric (entropies,
overlap masses, ...) and checks its inputs for NaN; this computes the loss alone. The sets are
`torch.topk`'s, whose order among tied logits is unspecified, so on tied logits (common in
bf16) its set may differ from the op's lowest-id rule; without ties the two agree.

Shapes: N rows, V vocabulary entries, k the top-k size.
"""

from __future__ import annotations

import torch

from opd_fast.op.names import (
    RENORMALISED_PG_VARIANTS,
    TAIL_COMPLEMENT_LOG_MASS,
    check_k,
    check_variant_estimator,
)

NEG_INF = float("-inf")


def _contains(ids: torch.Tensor, other_ids: torch.Tensor) -> torch.Tensor:
    """ids (N, a), other_ids (N, b) -> bool (N, a): is ids[r, i] among other_ids[r]."""
    return (ids.unsqueeze(-1) == other_ids.unsqueeze(-2)).any(dim=-1)


def _set_ids(variant, student_ids, teacher_ids, sampled_ids):
    """The set A of a variant as (ids (N, m), in_set bool (N, m)); no id appears twice among
    the entries that are in the set."""
    ones = torch.ones_like(student_ids, dtype=torch.bool)
    if variant == "student_topk":
        return student_ids, ones
    if variant == "teacher_topk":
        return teacher_ids, ones
    if variant == "sampled_token":
        return sampled_ids.unsqueeze(-1), ones[:, :1]
    student_in_teacher = _contains(student_ids, teacher_ids)
    if variant == "overlap_topk":
        return student_ids, student_in_teacher
    both = torch.cat([student_ids, teacher_ids], dim=-1)
    teacher_only = ~_contains(teacher_ids, student_ids)
    if variant == "nonoverlap_topk":
        return both, torch.cat([~student_in_teacher, teacher_only], dim=-1)
    if variant == "union_topk":
        return both, torch.cat([ones, teacher_only], dim=-1)
    raise ValueError(f"variant {variant!r} has no (N, m) set")


def _log_normalise(log_values: torch.Tensor, in_set: torch.Tensor) -> torch.Tensor:
    """log_values - logsumexp over the set, per row; -inf outside the set and on rows whose
    set holds no mass (empty, or all -inf), so those rows weigh nothing."""
    masked = log_values.masked_fill(~in_set, NEG_INF)
    has_mass = (masked > NEG_INF).any(dim=-1, keepdim=True)
    # massless rows get a dummy logsumexp: an all -inf one has a NaN gradient
    log_mass = torch.logsumexp(torch.where(has_mass, masked, 0.0), dim=-1, keepdim=True)
    return torch.where(has_mass, masked - log_mass, NEG_INF)


def _pg_rows(variant, log_p_set, log_q_set, in_set):
    """pg surrogate per row (docs/math.md, pg): value -sum_A a(v), gradient that of
    -sum_A a(v) log p(v) with the advantages a constant. log_p_set carries the gradient."""
    log_p_const = log_p_set.detach()
    if variant == "sampled_token":
        weight = torch.ones_like(log_p_const)
    elif variant in RENORMALISED_PG_VARIANTS:
        weight = _log_normalise(log_p_const, in_set).exp()
    else:  # nonoverlap_topk: raw p(v)
        weight = torch.where(in_set, log_p_const.exp(), 0.0)
    active = weight > 0  # 0 * inf = 0: a weightless entry adds nothing, even at log q = -inf
    advantage = torch.where(active, weight * (log_q_set - log_p_const), 0.0)
    surrogate = -(advantage * torch.where(active, log_p_set, 0.0)).sum(dim=-1)
    return -advantage.sum(dim=-1) + (surrogate - surrogate.detach())


def _exact_rows(student_set_logits, teacher_set_logits, in_set):
    """Renormalised reverse KL over A from the gathered logits alone: KL(pbar || qbar) with
    pbar, qbar the softmaxes over A (the full log-partitions cancel)."""
    log_p_bar = _log_normalise(student_set_logits, in_set)
    log_q_bar = _log_normalise(teacher_set_logits, in_set)
    active = log_p_bar > NEG_INF
    # finite stand-ins outside `active`, so no inf * 0 reaches autograd
    safe_log_p_bar = torch.where(active, log_p_bar, 0.0)
    safe_log_q_bar = torch.where(active, log_q_bar, 0.0)
    terms = safe_log_p_bar.exp() * (safe_log_p_bar - safe_log_q_bar)
    return torch.where(active, terms, 0.0).sum(dim=-1)


def _log_set_mass(log_values: torch.Tensor, in_set: torch.Tensor) -> torch.Tensor:
    """logsumexp over the set per row (N,); -inf where it holds no mass (NaN-free gradient)."""
    masked = log_values.masked_fill(~in_set, NEG_INF)
    has_mass = (masked > NEG_INF).any(dim=-1)
    log_mass = torch.logsumexp(torch.where(has_mass.unsqueeze(-1), masked, 0.0), dim=-1)
    return torch.where(has_mass, log_mass, NEG_INF)


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0: expm1 above -ln 2, log1p below; -inf at x >= 0."""
    x = x.clamp_max(0)
    near_one = x > -0.6931471805599453
    close = torch.log(-torch.expm1(torch.where(near_one, x, -1.0)))
    away = torch.log1p(-torch.where(near_one, -1.0, x).exp())
    return torch.where(near_one, close, away)


def _tail_rows(log_p, log_q, ids, in_set):
    """tail per row (docs/math.md, tail): sum_A p (log p - log q) + P (log P - log Q) with the
    full-vocabulary p, q and P = 1 - sum_A p. 1 - mass loses its digits where A holds most of
    it (more than 15/16), so those rows (found with one host sync) sum their complement instead."""
    log_p_set, log_q_set = log_p.gather(-1, ids), log_q.gather(-1, ids)
    log_set_p, log_set_q = _log_set_mass(log_p_set, in_set), _log_set_mass(log_q_set, in_set)
    need = (log_set_p.detach() > TAIL_COMPLEMENT_LOG_MASS) | (log_set_q > TAIL_COMPLEMENT_LOG_MASS)
    log_tail_p = _log1m_exp(torch.where(need, -1.0, log_set_p))
    log_tail_q = _log1m_exp(torch.where(need, -1.0, log_set_q))
    rows = need.nonzero().squeeze(-1)
    if rows.numel():
        member = torch.zeros(rows.numel(), log_p.shape[-1], dtype=torch.int32, device=ids.device)
        member = member.scatter_add(-1, ids[rows], in_set[rows].to(torch.int32)) > 0
        rest_p = torch.logsumexp(log_p[rows].masked_fill(member, NEG_INF), dim=-1)
        rest_q = torch.logsumexp(log_q[rows].masked_fill(member, NEG_INF), dim=-1)
        log_tail_p = log_tail_p.index_copy(0, rows, rest_p)
        log_tail_q = log_tail_q.index_copy(0, rows, rest_q)
    active = in_set & (log_p_set.detach() > NEG_INF)
    safe_p = torch.where(active, log_p_set, 0.0)  # finite stand-ins: no inf * 0 in autograd
    safe_q = torch.where(active, log_q_set, 0.0)
    in_set_part = torch.where(active, safe_p.exp() * (safe_p - safe_q), 0.0).sum(dim=-1)
    has_tail = log_tail_p.detach() > NEG_INF
    safe_tail_p = torch.where(has_tail, log_tail_p, 0.0)
    safe_tail_q = torch.where(has_tail, log_tail_q, 0.0)
    return in_set_part + torch.where(has_tail, safe_tail_p.exp() * (safe_tail_p - safe_tail_q), 0.0)


def careful_opd_loss_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    k: int = 16,
    variant: str = "student_topk",
    estimator: str = "pg",
    temperature: float = 1.0,
    sampled_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row loss L_t (N,), differentiable w.r.t. student_logits.

    student_logits, teacher_logits: (N, V); sampled_ids: (N,) int64 (sampled_token only).
    Computes in fp32 (fp64 for fp64 logits), like the op.
    """
    check_variant_estimator(variant, estimator, where="careful_opd_loss: ")
    check_k(k, student_logits.shape[-1], where="careful_opd_loss: ")
    if variant == "sampled_token" and sampled_ids is None:
        raise ValueError("careful_opd_loss: variant='sampled_token' needs sampled_ids")
    compute = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    student = student_logits.to(compute) / temperature
    teacher = teacher_logits.detach().to(compute) / temperature
    if variant == "full_vocab":  # KL(p || q); every estimator has this value and gradient
        log_p = torch.log_softmax(student, dim=-1)
        log_q = torch.log_softmax(teacher, dim=-1)
        p = log_p.exp()
        log_ratio = torch.where(p > 0, log_p - log_q, 0.0)  # 0 * inf = 0 where p = 0
        return (p * log_ratio).sum(dim=-1)
    with torch.no_grad():  # sets ranked on the raw logits: the order at every temperature
        student_ids = torch.topk(student_logits.detach(), k, dim=-1).indices
        teacher_ids = torch.topk(teacher_logits.detach(), k, dim=-1).indices
    ids, in_set = _set_ids(variant, student_ids, teacher_ids, sampled_ids)
    if estimator == "exact":
        return _exact_rows(student.gather(-1, ids), teacher.gather(-1, ids), in_set)
    if estimator == "tail":
        log_p, log_q = torch.log_softmax(student, dim=-1), torch.log_softmax(teacher, dim=-1)
        return _tail_rows(log_p, log_q, ids, in_set)
    log_p_set = torch.log_softmax(student, dim=-1).gather(-1, ids)
    log_q_set = torch.log_softmax(teacher, dim=-1).gather(-1, ids)
    return _pg_rows(variant, log_p_set, log_q_set, in_set)


def careful_opd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    k: int = 16,
    variant: str = "student_topk",
    estimator: str = "pg",
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    sampled_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token-mean loss over the valid rows (mask True), a 0-dim tensor.

    student_logits, teacher_logits: (N, V); mask: (N,) bool or None (all rows valid).
    """
    rows = careful_opd_loss_rows(
        student_logits,
        teacher_logits,
        k=k,
        variant=variant,
        estimator=estimator,
        temperature=temperature,
        sampled_ids=sampled_ids,
    )
    if mask is None:
        return rows.mean()
    valid = mask.bool()
    return torch.where(valid, rows, 0.0).sum() / valid.sum().clamp_min(1)
