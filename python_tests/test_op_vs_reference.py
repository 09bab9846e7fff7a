"""opd_fast.opd_loss against the pure-PyTorch reference (opd_fast.reference), and against the
formulas of OPD_SPEC.md sections 2-4 written out independently for tiny cases.

Every check compares the loss value, the gradient w.r.t. the student logits, every per-token
metric (return_token_metrics=True) and every batch mean.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    DEFAULT_THREADS,
    DEVICES,
    DTYPES,
    LARGE_VOCAB,
    TOLERANCES,
    VARIANT_ESTIMATORS,
    assert_close,
    check_against_reference,
    correlated_logits,
    dtype_id,
    log_space_floor,
    nearly_equal_logits,
    random_logits,
    random_mask,
    run_op,
    sampled_ids_from,
    tied_logits,
    with_neg_inf,
)

import opd_fast
from opd_fast.op.names import TOKEN_METRIC_NAMES, VARIANTS

pytestmark = pytest.mark.usefixtures("single_thread")

VE_PARAMS = [pytest.param(v, e, id=f"{v}-{e}") for v, e in VARIANT_ESTIMATORS]
DTYPE_PARAMS = [pytest.param(d, id=dtype_id(d)) for d in DTYPES]

# (N, V, k): N in {1, 97}; V in {1 (k=1), V == k, 1000}; k in {1, 5, 16, 64, 128}.
# V = 151,936 (several streaming blocks) is in test_matches_reference_large_vocab.
SHAPES = [
    pytest.param(1, 1, 1, id="N1-V1-k1"),
    pytest.param(97, 1, 1, id="N97-V1-k1"),
    pytest.param(97, 5, 5, id="N97-V5-k5"),
    pytest.param(1, 128, 128, id="N1-V128-k128"),
    pytest.param(97, 1000, 1, id="N97-V1000-k1"),
    pytest.param(97, 1000, 16, id="N97-V1000-k16"),
    pytest.param(1, 1000, 64, id="N1-V1000-k64"),
    pytest.param(97, 1000, 128, id="N97-V1000-k128"),
]

# The heavy cases: kept to N <= 3 rows (each reference run is 3 x 151,936 in fp64 and fp32).
LARGE_VOCAB_CASES = [
    pytest.param(dtype, 3, 16, 1.0, id=f"{dtype_id(dtype)}-N3-k16-t1.0") for dtype in DTYPES
] + [
    pytest.param(dtype, 2, 128, 0.7, id=f"{dtype_id(dtype)}-N2-k128-t0.7")
    for dtype in (torch.float32, torch.bfloat16)
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("rows, vocab, k", SHAPES)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("variant, estimator", VE_PARAMS)
def test_matches_reference(variant, estimator, dtype, rows, vocab, k, temperature, device):
    student, teacher = correlated_logits(
        (rows, vocab), seed=rows + vocab + k, dtype=dtype, device=device
    )
    check_against_reference(
        student,
        teacher,
        k=k,
        variant=variant,
        estimator=estimator,
        temperature=temperature,
        sampled_ids=sampled_ids_from(student, seed=k),
    )


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, rows, k, temperature", LARGE_VOCAB_CASES)
@pytest.mark.parametrize("variant, estimator", VE_PARAMS)
def test_matches_reference_large_vocab(variant, estimator, dtype, rows, k, temperature, device):
    student, teacher = correlated_logits(
        (rows, LARGE_VOCAB), seed=k, scale=4.0, dtype=dtype, device=device
    )
    check_against_reference(
        student,
        teacher,
        k=k,
        variant=variant,
        estimator=estimator,
        temperature=temperature,
        sampled_ids=sampled_ids_from(student, seed=k),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("variant, estimator", VE_PARAMS)
def test_matches_reference_independent_models(variant, estimator, dtype, temperature, device):
    """Unrelated teacher: overlaps are often empty (overlap_token_advantage undefined)."""
    student, teacher = random_logits((97, 300), seed=5, dtype=dtype, device=device)
    out = check_against_reference(
        student,
        teacher,
        k=5,
        variant=variant,
        estimator=estimator,
        temperature=temperature,
        sampled_ids=sampled_ids_from(student),
    )
    empty = out.token_metrics["overlap_ratio"] == 0
    assert bool(empty.any()), "this case is meant to contain rows with an empty overlap"
    assert bool(out.token_metrics["overlap_token_advantage"][empty].isnan().all())
    assert float(out.means["overlap_empty_rows"]) == float(empty.sum())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("variant, estimator", VE_PARAMS)
def test_nearly_equal_models(variant, estimator, dtype, device):
    student, teacher = nearly_equal_logits((64, 500), seed=11, dtype=dtype, device=device)
    out = check_against_reference(
        student,
        teacher,
        k=16,
        variant=variant,
        estimator=estimator,
        sampled_ids=sampled_ids_from(student),
    )
    assert float(out.means["overlap_ratio"]) > 0.8


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("variant, estimator", VE_PARAMS)
def test_identical_models_give_zero_loss_and_gradient(variant, estimator, dtype):
    student, _ = correlated_logits((16, 400), seed=2, dtype=dtype)
    out = run_op(
        student,
        student.clone(),
        k=16,
        variant=variant,
        estimator=estimator,
        sampled_ids=sampled_ids_from(student),
    )
    tol = TOLERANCES[dtype]
    # full_vocab's KL and C are differences of log-partition sums: a few ulp of the logits.
    log_floor = log_space_floor(student, student, 1.0)
    assert_close("loss", out.loss, torch.zeros_like(out.loss), atol=tol.rows_atol + log_floor)
    assert_close("grad", out.grad, torch.zeros_like(out.grad), atol=tol.grad_atol + log_floor / 16)
    assert bool((out.token_metrics["overlap_ratio"] == 1).all())
    assert_close(
        "sampled_token_kl",
        out.token_metrics["sampled_token_kl"],
        torch.zeros(16),
        atol=tol.rows_atol,
    )
    assert_close(
        "entropy_gap", out.token_metrics["entropy_gap"], torch.zeros(16), atol=tol.rows_atol
    )


# ---------------------------------------------------------------------------------------------
# (B, T, V) inputs, masks and reductions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean_token_sum", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("variant, estimator", VE_PARAMS)
def test_3d_with_mask(variant, estimator, dtype, reduction, device):
    batch, steps, vocab = 3, 17, 300
    student, teacher = correlated_logits((batch, steps, vocab), seed=7, dtype=dtype, device=device)
    mask = random_mask((batch, steps), seed=7, device=device)
    mask[1] = False  # a sequence with no valid token at all
    grad_output = None
    if reduction == "none":
        grad_output = torch.randn((batch, steps), generator=torch.Generator().manual_seed(1))
        grad_output = grad_output.to(torch.float64 if dtype == torch.float64 else torch.float32)
    out = check_against_reference(
        student,
        teacher,
        k=8,
        variant=variant,
        estimator=estimator,
        temperature=0.9,
        mask=mask,
        reduction=reduction,
        sampled_ids=sampled_ids_from(student),
        grad_output=grad_output,
    )
    expected_shape = (batch, steps) if reduction == "none" else ()
    assert tuple(out.loss.shape) == expected_shape
    masked_grad = out.grad[~mask]
    assert bool((masked_grad == 0).all()), "masked rows must get exactly zero gradient"
    if reduction == "none":
        assert bool((out.loss[~mask] == 0).all())
    assert float(out.means["num_tokens"]) == float(mask.sum())


@pytest.mark.parametrize("variant, estimator", VE_PARAMS)
def test_mask_excludes_rows_from_means(variant, estimator):
    """Masked rows must not change the loss or any mean: compare with the valid rows alone."""
    student, teacher = correlated_logits((40, 200), seed=3)
    mask = random_mask((40,), seed=3)
    ids = sampled_ids_from(student)
    kwargs = dict(k=8, variant=variant, estimator=estimator, sampled_ids=ids)
    full = run_op(student, teacher, mask=mask, **kwargs)
    kwargs["sampled_ids"] = ids[mask]
    valid_only = run_op(student[mask], teacher[mask], **kwargs)
    assert_close("loss", full.loss, valid_only.loss, atol=1e-6, rtol=1e-6)
    assert_close("grad", full.grad[mask], valid_only.grad, atol=1e-7, rtol=1e-5)
    for name, value in valid_only.means.items():
        assert_close(f"mean {name}", full.means[name], value, atol=1e-6, rtol=1e-6)


def test_float_mask_is_accepted():
    student, teacher = correlated_logits((20, 100), seed=4)
    mask = random_mask((20,), seed=4)
    bool_out = run_op(student, teacher, k=4, mask=mask)
    float_out = run_op(student, teacher, k=4, mask=mask.float())
    assert torch.equal(bool_out.loss, float_out.loss)
    assert torch.equal(bool_out.grad, float_out.grad)


# ---------------------------------------------------------------------------------------------
# Memory layouts
# ---------------------------------------------------------------------------------------------


def _layout(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values as `tensor` (N, V) in a non-contiguous layout."""
    rows, vocab = tensor.shape
    if layout == "row_stride":  # rows of a wider buffer: stride(0) = V + 13
        wide = torch.full((rows, vocab + 13), 7.0, dtype=tensor.dtype, device=tensor.device)
        wide[:, 5 : 5 + vocab] = tensor
        view = wide[:, 5 : 5 + vocab]
        assert view.stride() == (vocab + 13, 1)
        return view
    if layout == "transposed":  # a (V, N) buffer seen as (N, V): stride(1) = N
        view = tensor.t().contiguous().t()
        assert view.stride() == (1, rows)
        return view
    if layout == "every_other_row":  # stride(0) = 2V
        doubled = torch.zeros((2 * rows, vocab), dtype=tensor.dtype, device=tensor.device)
        doubled[::2] = tensor
        return doubled[::2]
    raise ValueError(layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["row_stride", "transposed", "every_other_row"])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("variant, estimator", VE_PARAMS)
def test_non_contiguous_inputs(variant, estimator, dtype, layout, device):
    student, teacher = correlated_logits((33, 2100), seed=9, dtype=dtype, device=device)
    ids = sampled_ids_from(student)
    kwargs = dict(k=16, variant=variant, estimator=estimator, temperature=0.8, sampled_ids=ids)
    strided_student, strided_teacher = _layout(student, layout), _layout(teacher, layout)
    assert not strided_student.is_contiguous()
    out = check_against_reference(strided_student, strided_teacher, **kwargs)
    contiguous = run_op(student, teacher, **kwargs)
    # The cpu kernels read a row the same way whatever its stride: bitwise equal. A GPU kernel
    # may take another load path for unaligned rows (another summation order).
    atol = 0.0 if device == "cpu" else 1e-6
    assert_close("loss", out.loss, contiguous.loss, atol=atol)
    assert_close("grad", out.grad, contiguous.grad, atol=atol * 1e-2)
    for name, value in contiguous.token_metrics.items():
        assert_close(name, out.token_metrics[name], value, atol=atol, rtol=atol)


@pytest.mark.parametrize("variant, estimator", VE_PARAMS)
def test_non_contiguous_3d_and_broadcast_teacher(variant, estimator):
    """A (B, T, V) slice along T and a teacher row broadcast with stride(0) = 0."""
    student, teacher = correlated_logits((2, 20, 300), seed=12)
    student = student[:, 3:17]
    teacher_row = teacher[0, 0]
    teacher = teacher_row.expand(2, 14, 300)
    assert not student.is_contiguous() and teacher.stride() == (0, 0, 1)
    check_against_reference(
        student,
        teacher,
        k=8,
        variant=variant,
        estimator=estimator,
        sampled_ids=sampled_ids_from(student),
    )


# ---------------------------------------------------------------------------------------------
# Ties and -inf
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 5, 16])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("variant, estimator", VE_PARAMS)
def test_ties_follow_lower_id_first(variant, estimator, dtype, k, device):
    """Integer logits: most top-k sets are decided by the tie rule. overlap_ratio is compared
    exactly (check_against_reference), so any other tie order fails."""
    student, teacher = tied_logits((97, 200), seed=k, levels=3, dtype=dtype, device=device)
    check_against_reference(
        student,
        teacher,
        k=k,
        variant=variant,
        estimator=estimator,
        temperature=0.5,
        sampled_ids=sampled_ids_from(student),
    )


def test_tie_rule_on_hand_built_rows():
    """Spec section 2 directly: among equal values the lower token id ranks first."""
    e = math.e
    # S_p = {0, 1} (ids 0-3 tied); S_q = {2, 3} (ids 2-5 tied): empty overlap.
    student = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 1.0]])
    out = opd_fast.opd_loss(student, teacher, k=2, return_token_metrics=True)
    metrics = out.token_metrics
    assert float(metrics["overlap_ratio"]) == 0.0
    assert math.isnan(float(metrics["overlap_token_advantage"]))
    assert float(out.metrics["overlap_empty_rows"]) == 1.0
    assert float(out.metrics["overlap_token_advantage"]) == 0.0
    assert float(metrics["student_topk_mass"]) == pytest.approx(2 * e / (4 * e + 2), rel=1e-6)
    assert float(metrics["teacher_topk_mass"]) == pytest.approx(2 * e / (4 * e + 2), rel=1e-6)

    # Everything tied: both sets are {0, ..., k-1}, so the overlap is complete.
    flat = torch.zeros(2, 50)
    out = opd_fast.opd_loss(flat, flat.clone(), k=7, return_token_metrics=True)
    assert bool((out.token_metrics["overlap_ratio"] == 1).all())
    assert float(out.metrics["student_topk_mass"]) == pytest.approx(7 / 50, rel=1e-6)

    # Ties at the k-th place: S_p = {3, 1, 2} ({1, 2, 5} tie for places 2-3 -> 1, 2 win),
    # S_q = {4, 2, 5} (5 at 2.0 > 1.0 ties). Overlap {2}.
    student = torch.tensor([[0.0, 1.0, 1.0, 5.0, 0.0, 1.0]])
    teacher = torch.tensor([[0.0, 1.0, 2.0, 0.0, 3.0, 2.0]])
    out = opd_fast.opd_loss(
        student, teacher, k=3, return_token_metrics=True, variant="overlap_topk"
    )
    assert float(out.token_metrics["overlap_ratio"]) == pytest.approx(1 / 3)
    p = torch.softmax(student.double(), -1)[0]
    q = torch.softmax(teacher.double(), -1)[0]
    assert float(out.token_metrics["overlap_mass_student"]) == pytest.approx(float(p[2]), 1e-6)
    assert float(out.token_metrics["overlap_mass_teacher"]) == pytest.approx(float(q[2]), 1e-6)
    # A = O = {2}: the pg weight is 1, so the loss is log p(2) - log q(2).
    assert float(out.loss) == pytest.approx(math.log(p[2] / q[2]), rel=1e-5)


NEG_INF_CASES = [
    pytest.param(dict(fraction=0.3), id="shared_mask"),
    pytest.param(dict(fraction=0.97, keep_finite=3), id="fewer_than_k_finite"),
    pytest.param(dict(fraction=0.0, student_only_fraction=0.3), id="student_only"),
    pytest.param(dict(fraction=0.2, student_only_fraction=0.2), id="shared_and_student_only"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", NEG_INF_CASES)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("variant, estimator", VE_PARAMS)
def test_neg_inf_entries(variant, estimator, dtype, case, device):
    student, teacher = correlated_logits((97, 150), seed=21, dtype=dtype, device=device)
    student, teacher = with_neg_inf(student, teacher, seed=21, **case)
    out = check_against_reference(
        student,
        teacher,
        k=16,
        variant=variant,
        estimator=estimator,
        temperature=1.3,
        sampled_ids=sampled_ids_from(student),
    )
    assert bool(torch.isfinite(out.loss).all())
    assert bool(torch.isfinite(out.grad).all())
    # -inf entries have zero probability: never any gradient there.
    assert bool((out.grad[torch.isinf(student)] == 0).all())


def test_neg_inf_rows_with_fewer_than_k_finite_entries():
    """Only 2 finite entries and k = 4: the -inf entries that fill the sets carry no mass."""
    student = torch.full((1, 10), float("-inf"))
    teacher = torch.full((1, 10), float("-inf"))
    student[0, 6], student[0, 8] = 1.0, 0.0
    teacher[0, 6], teacher[0, 8] = 0.0, 1.0
    for variant in ("student_topk", "teacher_topk", "overlap_topk", "union_topk"):
        out = run_op(student, teacher, k=4, variant=variant)
        metrics = out.token_metrics
        # S_p = {6, 8, 0, 1}, S_q = {8, 6, 0, 1}: full overlap by the tie rule.
        assert float(metrics["overlap_ratio"]) == 1.0
        assert float(metrics["student_topk_mass"]) == pytest.approx(1.0, rel=1e-6)
        assert float(metrics["overlap_mass_teacher"]) == pytest.approx(1.0, rel=1e-6)
        assert math.isfinite(float(out.loss))
        assert bool((out.grad[0, [0, 1, 2, 3, 4, 5, 7, 9]] == 0).all())


CONFIDENT_CASES = [
    pytest.param("teacher", id="confident_teacher"),
    pytest.param("student", id="confident_student"),
    pytest.param("low_temperature", id="low_temperature"),
]


@pytest.mark.parametrize("case", CONFIDENT_CASES)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("variant, estimator", VE_PARAMS)
def test_confident_models_do_not_underflow(variant, estimator, dtype, case):
    """Regression: set masses used to be summed in probability space, which is 0 in fp32 once
    every log-probability in the set is below about -104. A confident teacher (q ~ e^-200 off
    its top token) then gave an exact loss of -inf; renormalised pg weights silently became 0.
    """
    student, teacher = correlated_logits((24, 300), seed=31, scale=2.0, dtype=torch.float64)
    temperature = 1.0
    if case == "teacher":  # the teacher's top token lies outside the student's top-k
        teacher[:, 7] = 200.0
        student[:, 7] = -1.0
    elif case == "student":  # the student's top token lies outside the teacher's top-k
        student[:, 7] = 200.0
        teacher[:, 7] = -1.0
    else:
        student, teacher = correlated_logits(
            (24, 300), seed=31, scale=3.0, noise=2.0, dtype=torch.float64
        )
        temperature = 0.03
    student, teacher = student.to(dtype), teacher.to(dtype)
    out = check_against_reference(
        student,
        teacher,
        k=8,
        variant=variant,
        estimator=estimator,
        temperature=temperature,
        sampled_ids=sampled_ids_from(student * 0),  # uniform draw: most are improbable tokens
    )
    assert bool(torch.isfinite(out.loss).all())
    assert bool(torch.isfinite(out.grad).all())


# ---------------------------------------------------------------------------------------------
# sampled_ids, dtypes, autograd plumbing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_sampled_token_kl_present_only_with_sampled_ids(dtype):
    student, teacher = correlated_logits((30, 100), seed=1, dtype=dtype)
    without = opd_fast.opd_loss(student, teacher, k=4, return_token_metrics=True)
    assert "sampled_token_kl" not in without.metrics
    assert "sampled_token_kl" not in without.token_metrics
    ids = sampled_ids_from(student)
    with_ids = opd_fast.opd_loss(
        student, teacher, k=4, sampled_ids=ids, return_token_metrics=True, temperature=0.6
    )
    rows = torch.arange(30)
    log_p = torch.log_softmax(student.double() / 0.6, -1)[rows, ids]
    log_q = torch.log_softmax(teacher.double() / 0.6, -1)[rows, ids]
    assert_close(
        "sampled_token_kl",
        with_ids.token_metrics["sampled_token_kl"],
        log_p - log_q,
        atol=2e-5,
        rtol=2e-5,
    )
    assert_close(
        "mean sampled_token_kl",
        with_ids.metrics["sampled_token_kl"],
        (log_p - log_q).mean(),
        atol=2e-5,
        rtol=2e-5,
    )
    # The other outputs do not depend on whether sampled_ids is given.
    same_temperature = opd_fast.opd_loss(
        student, teacher, k=4, sampled_ids=ids, return_token_metrics=True
    )
    assert torch.equal(without.loss, same_temperature.loss)
    for name, value in without.token_metrics.items():
        assert torch.equal(value.nan_to_num(), same_temperature.token_metrics[name].nan_to_num())


@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32, torch.int16])
def test_sampled_ids_integer_dtypes(ids_dtype):
    student, teacher = correlated_logits((12, 100), seed=6)
    ids = sampled_ids_from(student)
    reference_out = run_op(student, teacher, variant="sampled_token", sampled_ids=ids)
    out = run_op(student, teacher, variant="sampled_token", sampled_ids=ids.to(ids_dtype))
    assert torch.equal(out.loss, reference_out.loss)
    assert torch.equal(out.grad, reference_out.grad)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("variant, estimator", VE_PARAMS)
def test_gradient_dtype_and_teacher_gets_no_grad(variant, estimator, dtype):
    student, teacher = correlated_logits((8, 64), seed=2, dtype=dtype)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    out = opd_fast.opd_loss(
        student,
        teacher,
        k=4,
        variant=variant,
        estimator=estimator,
        sampled_ids=sampled_ids_from(student),
    )
    out.loss.backward()
    assert teacher.grad is None
    assert student.grad is not None
    assert student.grad.dtype == dtype and student.grad.shape == student.shape
    assert student.grad.is_contiguous()
    for value in out.metrics.values():
        assert not value.requires_grad


def test_only_the_loss_carries_a_graph():
    """Metrics are detached; only the loss carries a graph."""
    student, teacher = correlated_logits((4, 32), seed=8)
    student.requires_grad_(True)
    out = opd_fast.opd_loss(student, teacher, k=4, return_token_metrics=True)
    assert out.loss.requires_grad
    assert not any(value.requires_grad for value in out.token_metrics.values())


def test_module_matches_function():
    student, teacher = correlated_logits((2, 9, 120), seed=10)
    mask = random_mask((2, 9), seed=10)
    module = opd_fast.OPDLoss(
        k=5,
        variant="union_topk",
        estimator="exact",
        temperature=0.8,
        reduction="seq_mean_token_sum",
    )
    assert "union_topk" in repr(module)
    from_module = module(student, teacher, mask=mask)
    from_function = opd_fast.opd_loss(
        student,
        teacher,
        k=5,
        variant="union_topk",
        estimator="exact",
        temperature=0.8,
        mask=mask,
        reduction="seq_mean_token_sum",
    )
    assert torch.equal(from_module.loss, from_function.loss)


@pytest.mark.parametrize("variant, estimator", VE_PARAMS)
def test_shift_invariance(variant, estimator):
    """Softmax is invariant to a per-row constant, so every output must be too (in fp32, with
    logits offset by +40 as real LM logits often are)."""
    student, teacher = correlated_logits((32, 3000), seed=13, dtype=torch.float64)
    ids = sampled_ids_from(student)
    kwargs = dict(k=16, variant=variant, estimator=estimator, sampled_ids=ids)
    base = run_op(student.float(), teacher.float(), **kwargs)
    offsets = torch.linspace(-40.0, 40.0, 32, dtype=torch.float64)[:, None]
    shifted = run_op((student + offsets).float(), (teacher - offsets / 2).float(), **kwargs)
    for name, value in base.token_metrics.items():
        assert_close(name, shifted.token_metrics[name], value, atol=2e-4, rtol=1e-4)
    assert_close("grad", shifted.grad, base.grad, atol=1e-6, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# The spec's formulas, written out per row in plain Python (independent of the reference)
# ---------------------------------------------------------------------------------------------


def _spec_row(z, u, k, variant, estimator, tau, y):
    """Loss, gradient and metrics of one row straight from OPD_SPEC.md sections 2-4."""
    vocab = len(z)

    def top(values):
        return set(sorted(range(vocab), key=lambda j: (-values[j], j))[:k])

    def log_softmax(values):
        scaled = [v / tau for v in values]
        m = max(scaled)
        lse = m + math.log(sum(math.exp(s - m) for s in scaled))
        return [s - lse for s in scaled]

    log_p, log_q = log_softmax(z), log_softmax(u)
    p, q = [math.exp(x) for x in log_p], [math.exp(x) for x in log_q]
    s_p, s_q = top(z), top(u)
    sets = {
        "student_topk": s_p,
        "teacher_topk": s_q,
        "overlap_topk": s_p & s_q,
        "nonoverlap_topk": s_p ^ s_q,
        "union_topk": s_p | s_q,
        "full_vocab": set(range(vocab)),
        "sampled_token": {y},
    }
    a = sets[variant]
    grad = [0.0] * vocab
    if estimator == "exact":
        zp = sum(p[v] for v in a)
        zq = sum(q[v] for v in a)
        pbar = {v: p[v] / zp for v in a}
        qbar = {v: q[v] / zq for v in a}
        loss = sum(pbar[v] * (math.log(pbar[v]) - math.log(qbar[v])) for v in a)
        for j in a:
            grad[j] = pbar[j] * (math.log(pbar[j]) - math.log(qbar[j]) - loss) / tau
    elif estimator == "tail":  # the |A|+1 categories: each v in A, and the rest of the vocab
        rest_p = sum(p[v] for v in range(vocab) if v not in a)
        rest_q = sum(q[v] for v in range(vocab) if v not in a)
        gap = math.log(rest_p / rest_q) if rest_p > 0 else 0.0
        loss = sum(p[v] * (log_p[v] - log_q[v]) for v in a) + rest_p * gap
        # dL/dp_v = a_v - gap for v in A (the rest loses what v gains); dp_v/dz_j through the
        # softmax Jacobian p_v (delta_vj - p_j) / tau
        slope = {v: log_p[v] - log_q[v] - gap for v in a}
        grad = [sum(slope[v] * p[v] * ((v == j) - p[j]) for v in a) / tau for j in range(vocab)]
    else:
        if variant == "sampled_token":
            weight = {y: 1.0}
        elif variant in ("nonoverlap_topk", "full_vocab"):
            weight = {v: p[v] for v in a}
        else:
            zp = sum(p[v] for v in a)
            weight = {v: p[v] / zp for v in a}
        c = {v: weight[v] * (log_q[v] - log_p[v]) for v in a}
        loss = -sum(c.values())
        big_c = sum(c.values())
        grad = [(big_c * p[j] - c.get(j, 0.0)) / tau for j in range(vocab)]
    overlap = s_p & s_q
    mass_p = sum(p[v] for v in overlap)
    mass_q = sum(q[v] for v in overlap)
    if overlap:
        advantage = sum(
            (p[v] / mass_p) * (math.log(q[v] / mass_q) - math.log(p[v] / mass_p)) for v in overlap
        ) / len(overlap)
    else:
        advantage = math.nan
    h_p = -sum(pv * lp for pv, lp in zip(p, log_p))
    h_q = -sum(qv * lq for qv, lq in zip(q, log_q))
    metrics = {
        "overlap_ratio": len(overlap) / k,
        "overlap_mass_student": mass_p,
        "overlap_mass_teacher": mass_q,
        "overlap_token_advantage": advantage,
        "entropy_student": h_p,
        "entropy_teacher": h_q,
        "entropy_gap": abs(h_q - h_p),
        "student_topk_mass": sum(p[v] for v in s_p),
        "teacher_topk_mass": sum(q[v] for v in s_q),
        "sampled_token_kl": log_p[y] - log_q[y],
    }
    return loss, grad, metrics


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("variant, estimator", VE_PARAMS)
def test_matches_spec_formulas(variant, estimator, temperature):
    rows, vocab, k = 6, 12, 3
    student, teacher = correlated_logits((rows, vocab), seed=17, dtype=torch.float64, noise=2.0)
    # Two rows with ties, to exercise the tie rule through the spec's sort key as well.
    student[4] = torch.tensor([2.0, 1, 2, 0, 2, 1, 0, 0, 1, 2, 0, 1])
    teacher[4] = torch.tensor([1.0, 2, 2, 1, 0, 2, 1, 0, 2, 0, 1, 2])
    student[5] = torch.zeros(vocab)
    ids = sampled_ids_from(student, seed=3)
    out = run_op(
        student,
        teacher,
        k=k,
        variant=variant,
        estimator=estimator,
        temperature=temperature,
        sampled_ids=ids,
        reduction="sum",
    )
    for row in range(rows):
        loss, grad, metrics = _spec_row(
            student[row].tolist(),
            teacher[row].tolist(),
            k,
            variant,
            estimator,
            temperature,
            int(ids[row]),
        )
        assert_close(
            f"row {row} loss",
            out.token_metrics["loss"][row],
            torch.tensor(loss, dtype=torch.float64),
            atol=1e-12,
            rtol=1e-10,
        )
        assert_close(
            f"row {row} grad",
            out.grad[row],
            torch.tensor(grad, dtype=torch.float64),
            atol=1e-12,
            rtol=1e-10,
        )
        for name in TOKEN_METRIC_NAMES:
            assert_close(
                f"row {row} {name}",
                out.token_metrics[name][row],
                torch.tensor(metrics[name], dtype=torch.float64),
                atol=1e-12,
                rtol=1e-10,
            )


def test_variants_cover_spec_table():
    assert set(VARIANTS) == {
        "student_topk",
        "teacher_topk",
        "overlap_topk",
        "nonoverlap_topk",
        "union_topk",
        "full_vocab",
        "sampled_token",
    }


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("variant, estimator", VE_PARAMS)
def test_threads_agree(variant, estimator, dtype):
    """Rows are independent: a multi-threaded run must equal the single-threaded one bitwise."""
    student, teacher = correlated_logits((37, 3000), seed=14, dtype=dtype)
    kwargs = dict(
        k=16,
        variant=variant,
        estimator=estimator,
        sampled_ids=sampled_ids_from(student),
        mask=random_mask((37,), seed=14),
    )
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run_op(student, teacher, **kwargs)
        torch.set_num_threads(max(2, DEFAULT_THREADS))
        multi = run_op(student, teacher, **kwargs)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(single.grad, multi.grad)
    for name, value in single.token_metrics.items():
        assert torch.equal(value.nan_to_num(), multi.token_metrics[name].nan_to_num()), name
