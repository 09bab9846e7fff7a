"""Hypothesis property tests over random small shapes, k, temperatures, variants, estimators,
fp32/fp64, random -inf masks and ties: the op matches the reference, and the invariants of
OPD_SPEC.md sections 2-4 hold."""

from __future__ import annotations

import pytest
import torch
from conftest import VARIANT_ESTIMATORS, check_against_reference, run_op
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import opd_fast

pytestmark = pytest.mark.usefixtures("single_thread")

PROPERTY_SETTINGS = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,  # the same examples every run: CI failures reproduce locally
    # single_thread (a function-scoped fixture) only sets the thread count: safe to share.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@st.composite
def opd_cases(draw, dtypes=(torch.float32, torch.float64)):
    """A random small problem: logits (with ties and -inf entries), k, variant, estimator."""
    rows = draw(st.integers(1, 9))
    vocab = draw(st.integers(1, 80))
    k = draw(st.integers(1, min(vocab, 20)))
    variant, estimator = draw(st.sampled_from(VARIANT_ESTIMATORS))
    dtype = draw(st.sampled_from(dtypes))
    temperature = draw(st.sampled_from([0.3, 0.7, 1.0, 1.5, 4.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    style = draw(st.sampled_from(["gaussian", "ties", "correlated"]))
    shared_inf = draw(st.sampled_from([0.0, 0.0, 0.3, 0.9]))
    student_inf = draw(st.sampled_from([0.0, 0.0, 0.2]))
    gen = torch.Generator().manual_seed(seed)
    shape = (rows, vocab)
    if style == "ties":
        student = torch.randint(-2, 3, shape, generator=gen).double()
        teacher = torch.randint(-2, 3, shape, generator=gen).double()
    elif style == "correlated":
        student = 3 * torch.randn(shape, generator=gen, dtype=torch.float64)
        teacher = student + torch.randn(shape, generator=gen, dtype=torch.float64)
    else:
        student = 2 * torch.randn(shape, generator=gen, dtype=torch.float64)
        teacher = 2 * torch.randn(shape, generator=gen, dtype=torch.float64)
    # -inf at the same entries in both (masked vocabulary) and some in the student only; every
    # row keeps one finite entry in both (a random one, not always id 0).
    shared = torch.rand(shape, generator=gen) < shared_inf
    student_only = torch.rand(shape, generator=gen) < student_inf
    keep = torch.randint(0, vocab, (rows, 1), generator=gen)
    keep_mask = torch.zeros(shape, dtype=torch.bool).scatter_(1, keep, True)
    shared &= ~keep_mask
    student_only &= ~keep_mask
    student = student.masked_fill(shared | student_only, float("-inf")).to(dtype)
    teacher = teacher.masked_fill(shared, float("-inf")).to(dtype)
    # Realised tokens drawn from the student (so they have non-zero probability).
    probs = torch.softmax(student.double(), dim=-1)
    sampled_ids = torch.multinomial(probs, 1, generator=gen)[:, 0]
    return dict(
        student=student,
        teacher=teacher,
        k=k,
        variant=variant,
        estimator=estimator,
        temperature=temperature,
        sampled_ids=sampled_ids,
    )


def _kwargs(case):
    return {key: value for key, value in case.items() if key not in ("student", "teacher")}


@PROPERTY_SETTINGS
@given(case=opd_cases())
def test_matches_reference(case):
    check_against_reference(case["student"], case["teacher"], **_kwargs(case))


@PROPERTY_SETTINGS
@given(case=opd_cases())
def test_invariants(case):
    student, teacher, k = case["student"], case["teacher"], case["k"]
    out = run_op(student, teacher, **_kwargs(case))
    metrics = out.token_metrics
    slack = 1e-5 if student.dtype == torch.float32 else 1e-12

    ratio = metrics["overlap_ratio"]
    assert bool(((ratio >= 0) & (ratio <= 1)).all())
    # |O| / k is a count: an integer multiple of 1 / k.
    count = ratio.double() * k
    assert bool(((count - count.round()).abs() < 1e-4).all())
    for name in (
        "overlap_mass_student",
        "overlap_mass_teacher",
        "student_topk_mass",
        "teacher_topk_mass",
    ):
        assert bool(((metrics[name] >= 0) & (metrics[name] <= 1 + slack)).all()), name
    # O is a subset of both top-k sets.
    assert bool((metrics["student_topk_mass"] >= metrics["overlap_mass_student"] - slack).all())
    assert bool((metrics["teacher_topk_mass"] >= metrics["overlap_mass_teacher"] - slack).all())
    # Top-k of a distribution holds at least k / V of its mass.
    vocab = student.shape[-1]
    assert bool((metrics["student_topk_mass"] >= k / vocab - slack).all())
    # Entropies: 0 <= H <= log(number of finite entries); the gap is their distance.
    for name, logits in (("entropy_student", student), ("entropy_teacher", teacher)):
        finite = torch.isfinite(logits).sum(dim=-1).double()
        assert bool((metrics[name] >= -slack).all()), name
        assert bool((metrics[name] <= finite.log() + 10 * slack).all()), name
    gap = (metrics["entropy_teacher"] - metrics["entropy_student"]).abs()
    assert bool(((metrics["entropy_gap"] - gap).abs() <= 10 * slack).all())
    # overlap_token_advantage: NaN exactly when O is empty; else a mean of -KL terms <= 0.
    advantage = metrics["overlap_token_advantage"]
    assert torch.equal(advantage.isnan(), ratio == 0)
    assert bool((advantage[ratio > 0] <= 10 * slack).all())

    loss = metrics["loss"]
    if case["variant"] == "full_vocab" or case["estimator"] == "exact":
        # A KL divergence (of renormalised distributions for the exact estimator) is >= 0.
        assert bool((loss >= -10 * slack).all()), loss
    # Softmax gradients are shift invariant: every gradient row sums to zero.
    grad = out.grad.double()
    row_sums = grad.sum(dim=-1)
    scale = grad.abs().sum(dim=-1).clamp_min(1e-30)
    assert bool((row_sums.abs() <= 1e-4 * scale + 1e-12).all()), row_sums
    # -inf entries of the student have zero probability and get no gradient.
    assert bool((grad[torch.isinf(student)] == 0).all())
    # sampled_token_kl is log p(y) - log q(y).
    rows = torch.arange(student.shape[0])
    tau = case["temperature"]
    log_p = torch.log_softmax(student.double() / tau, -1)[rows, case["sampled_ids"]]
    log_q = torch.log_softmax(teacher.double() / tau, -1)[rows, case["sampled_ids"]]
    expected_kl = log_p - log_q
    both_finite = torch.isfinite(expected_kl)
    assert bool(
        (
            (metrics["sampled_token_kl"].double() - expected_kl)[both_finite].abs()
            <= 1e-4 * (1 + expected_kl[both_finite].abs())
        ).all()
    )


@PROPERTY_SETTINGS
@given(case=opd_cases(dtypes=(torch.float64,)), shift=st.floats(-30, 30))
def test_shift_invariance(case, shift):
    """Adding a constant to a row of logits changes no output (fp64)."""
    kwargs = _kwargs(case)
    base = run_op(case["student"], case["teacher"], **kwargs)
    shifted = run_op(case["student"] + shift, case["teacher"] - shift / 3, **kwargs)
    torch.testing.assert_close(shifted.grad, base.grad, rtol=1e-7, atol=1e-10)
    for name, value in base.token_metrics.items():
        torch.testing.assert_close(
            shifted.token_metrics[name], value, rtol=1e-7, atol=1e-9, equal_nan=True, msg=name
        )


@PROPERTY_SETTINGS
@given(case=opd_cases(dtypes=(torch.float64,)))
def test_row_permutation_equivariance(case):
    """Rows are independent: permuting them permutes every per-token output."""
    kwargs = _kwargs(case)
    rows = case["student"].shape[0]
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(rows))
    base = run_op(case["student"], case["teacher"], reduction="none", **kwargs)
    kwargs["sampled_ids"] = case["sampled_ids"][perm]
    permuted = run_op(case["student"][perm], case["teacher"][perm], reduction="none", **kwargs)
    assert torch.equal(permuted.grad, base.grad[perm])
    for name, value in base.token_metrics.items():
        assert torch.equal(permuted.token_metrics[name].nan_to_num(), value[perm].nan_to_num())


@PROPERTY_SETTINGS
@given(case=opd_cases(dtypes=(torch.float64,)))
def test_set_sizes_follow_variant(case):
    """Where O = S_p = S_q (overlap_ratio 1) the student, teacher, union and overlap sets are
    one set, so their pg losses must be equal row by row."""
    kwargs = _kwargs(case)
    kwargs["estimator"] = "pg"
    student, teacher = case["student"], case["teacher"]
    if kwargs["variant"] == "sampled_token":
        kwargs["variant"] = "student_topk"
    out = opd_fast.opd_loss(student, teacher, return_token_metrics=True, **kwargs)
    metrics = out.token_metrics
    full_overlap = metrics["overlap_ratio"] == 1
    losses = {}
    for variant in ("student_topk", "teacher_topk", "union_topk", "overlap_topk"):
        kwargs["variant"] = variant
        losses[variant] = opd_fast.opd_loss(
            student, teacher, return_token_metrics=True, **kwargs
        ).token_metrics["loss"]
    for variant in ("teacher_topk", "union_topk", "overlap_topk"):
        torch.testing.assert_close(
            losses[variant][full_overlap],
            losses["student_topk"][full_overlap],
            rtol=1e-9,
            atol=1e-12,
        )
