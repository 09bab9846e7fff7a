"""CUDA kernels: the op on cuda against the reference on cpu, and against the cpu kernels.

Skipped without a GPU (or without opd_fast's CUDA kernels). Many tests in the other files also
run on cuda through their `devices` parametrisation; these add the cuda-specific cases: the
large vocabulary, ties and -inf through the GPU top-k, agreement with the cpu kernels, and a
bf16 batch of 512 tokens.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    LARGE_VOCAB,
    TOLERANCES,
    VARIANT_ESTIMATORS,
    assert_close,
    check_against_reference,
    correlated_logits,
    dtype_id,
    log_space_floor,
    random_mask,
    run_op,
    sampled_ids_from,
    tied_logits,
    with_neg_inf,
)

import opd_fast

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.skipif(
        not (torch.cuda.is_available() and opd_fast.build_info().get("with_cuda", False)),
        reason="needs a CUDA GPU and opd_fast built with its CUDA kernels",
    ),
]

DEVICE = "cuda"
VE_PARAMS = [pytest.param(v, e, id=f"{v}-{e}") for v, e in VARIANT_ESTIMATORS]
CUDA_DTYPES = [
    pytest.param(d, id=dtype_id(d)) for d in (torch.float32, torch.bfloat16, torch.float16)
]


@pytest.mark.parametrize(
    "rows, vocab, k",
    [
        pytest.param(97, 1000, 16, id="N97-V1000-k16"),
        pytest.param(64, 4099, 128, id="N64-V4099-k128"),
        pytest.param(1, 1, 1, id="N1-V1-k1"),
        pytest.param(33, 7, 7, id="N33-V7-k7"),
    ],
)
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("variant, estimator", VE_PARAMS)
def test_cuda_matches_reference(variant, estimator, dtype, rows, vocab, k):
    student, teacher = correlated_logits((rows, vocab), seed=k, dtype=dtype, device=DEVICE)
    check_against_reference(
        student,
        teacher,
        k=k,
        variant=variant,
        estimator=estimator,
        temperature=0.8,
        sampled_ids=sampled_ids_from(student),
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "rows, k", [pytest.param(3, 16, id="N3-k16"), pytest.param(2, 128, id="N2-k128")]
)
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("variant, estimator", VE_PARAMS)
def test_cuda_large_vocab_matches_reference(variant, estimator, dtype, rows, k):
    student, teacher = correlated_logits(
        (rows, LARGE_VOCAB), seed=k, scale=4.0, dtype=dtype, device=DEVICE
    )
    check_against_reference(
        student,
        teacher,
        k=k,
        variant=variant,
        estimator=estimator,
        sampled_ids=sampled_ids_from(student),
    )


@pytest.mark.parametrize("vocab", [300, LARGE_VOCAB])
@pytest.mark.parametrize("k", [1, 16, 128])
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("variant, estimator", VE_PARAMS)
def test_cuda_ties(variant, estimator, dtype, k, vocab):
    """Integer logits: the GPU top-k must break ties towards the lower id exactly."""
    rows = 2 if vocab == LARGE_VOCAB else 64
    student, teacher = tied_logits((rows, vocab), seed=k, levels=2, dtype=dtype, device=DEVICE)
    check_against_reference(
        student,
        teacher,
        k=k,
        variant=variant,
        estimator=estimator,
        sampled_ids=sampled_ids_from(student),
    )


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(dict(fraction=0.3), id="shared_mask"),
        pytest.param(dict(fraction=0.97, keep_finite=3), id="fewer_than_k_finite"),
        pytest.param(dict(fraction=0.0, student_only_fraction=0.3), id="student_only"),
    ],
)
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("variant, estimator", VE_PARAMS)
def test_cuda_neg_inf(variant, estimator, dtype, case):
    student, teacher = correlated_logits((64, 600), seed=3, dtype=dtype, device=DEVICE)
    student, teacher = with_neg_inf(student, teacher, seed=3, **case)
    out = check_against_reference(
        student,
        teacher,
        k=16,
        variant=variant,
        estimator=estimator,
        sampled_ids=sampled_ids_from(student),
    )
    assert bool((out.grad[torch.isinf(student)] == 0).all())


@pytest.mark.parametrize("dtype", [*CUDA_DTYPES, pytest.param(torch.float64, id="float64")])
@pytest.mark.parametrize("variant, estimator", VE_PARAMS)
def test_cuda_agrees_with_cpu_kernels(variant, estimator, dtype):
    """The two backends on the same values: identical sets, losses/gradients/metrics within the
    accumulation precision (different summation orders and exp implementations)."""
    student, teacher = correlated_logits((2, 8, 5000), seed=5, dtype=dtype)
    mask = random_mask((2, 8), seed=5)
    kwargs = dict(
        k=32,
        variant=variant,
        estimator=estimator,
        temperature=1.1,
        mask=mask,
        sampled_ids=sampled_ids_from(student),
        reduction="none",
    )
    cpu = run_op(student, teacher, **kwargs)
    kwargs.update(mask=mask.to(DEVICE), sampled_ids=kwargs["sampled_ids"].to(DEVICE))
    gpu = run_op(student.to(DEVICE), teacher.to(DEVICE), **kwargs)
    tol = TOLERANCES[dtype]
    floor = log_space_floor(student, teacher, 1.1)
    assert gpu.grad.dtype == dtype and gpu.grad.device.type == DEVICE
    assert torch.equal(gpu.token_metrics["overlap_ratio"].cpu(), cpu.token_metrics["overlap_ratio"])
    assert_close("loss", gpu.loss, cpu.loss, atol=tol.rows_atol + floor, rtol=tol.rows_rtol)
    grad_scale = float(cpu.grad.double().abs().max())
    if dtype in (torch.bfloat16, torch.float16):  # one rounding of each side to the dtype
        grad_atol = 2 * torch.finfo(dtype).eps * grad_scale
    else:
        grad_atol = tol.grad_rtol * grad_scale + tol.grad_atol
    assert_close("grad", gpu.grad, cpu.grad, atol=grad_atol + 4 * floor)
    valid = mask
    for name, value in cpu.token_metrics.items():
        assert_close(
            name,
            gpu.token_metrics[name][valid.to(DEVICE)],
            value[valid],
            atol=tol.rows_atol + floor,
            rtol=tol.rows_rtol,
        )


@pytest.mark.parametrize("variant, estimator", VE_PARAMS)
def test_cuda_bf16_batch_of_512(variant, estimator):
    """bf16, N = 512 tokens as (B, T) = (4, 128) with a mask: against the reference."""
    student, teacher = correlated_logits(
        (4, 128, 8192), seed=7, dtype=torch.bfloat16, device=DEVICE
    )
    mask = random_mask((4, 128), seed=7, fraction_valid=0.9, device=DEVICE)
    out = check_against_reference(
        student,
        teacher,
        k=16,
        variant=variant,
        estimator=estimator,
        mask=mask,
        sampled_ids=sampled_ids_from(student),
    )
    assert bool((out.grad[~mask] == 0).all())


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant, estimator", [("student_topk", "pg"), ("full_vocab", "exact"), ("union_topk", "exact")]
)
def test_cuda_bf16_512_large_vocab_agrees_with_cpu(variant, estimator):
    """bf16, N = 512, V = 151,936 (the realistic shape): cuda against the cpu kernels."""
    student, teacher = correlated_logits((512, LARGE_VOCAB), seed=8, dtype=torch.bfloat16)
    kwargs = dict(k=16, variant=variant, estimator=estimator, reduction="none")
    cpu = run_op(student, teacher, **kwargs)
    gpu = run_op(student.to(DEVICE), teacher.to(DEVICE), **kwargs)
    floor = log_space_floor(student, teacher, 1.0)
    assert torch.equal(gpu.token_metrics["overlap_ratio"].cpu(), cpu.token_metrics["overlap_ratio"])
    assert_close("loss", gpu.loss, cpu.loss, atol=2e-5 + floor, rtol=2e-5)
    grad_scale = float(cpu.grad.double().abs().max())
    assert_close(
        "grad",
        gpu.grad,
        cpu.grad,
        atol=2 * torch.finfo(torch.bfloat16).eps * grad_scale + 4 * floor,
    )


def test_cuda_non_contiguous_and_no_teacher_grad():
    student, teacher = correlated_logits((40, 3000), seed=9, device=DEVICE)
    strided_student = student.t().contiguous().t()
    wide = torch.zeros(40, 3100, device=DEVICE)
    wide[:, 50:3050] = teacher
    strided_teacher = wide[:, 50:3050]
    strided_teacher.requires_grad_(True)
    check_against_reference(strided_student, strided_teacher.detach(), k=16)
    leaf = strided_student.clone().requires_grad_(True)
    opd_fast.opd_loss(leaf, strided_teacher, k=16).loss.backward()
    assert strided_teacher.grad is None and leaf.grad.device.type == DEVICE


def test_cuda_error_names_device_mismatch():
    student, teacher = correlated_logits((4, 50), seed=1)
    with pytest.raises(
        ValueError,
        match=r"device mismatch: student_logits on cuda:0, "
        r"teacher_logits on cpu",
    ):
        opd_fast.opd_loss(student.to(DEVICE), teacher, k=4)
    with pytest.raises(RuntimeError, match=r"on cpu but student_logits on cuda|teacher_logits on"):
        torch.ops.opd_fast.opd_forward(
            student.to(DEVICE), teacher, None, None, 4, "student_topk", "pg", 1.0
        )


def test_cuda_non_finite_values_are_reported():
    student, teacher = correlated_logits((6, 500), seed=2, device=DEVICE)
    student[4, 10] = float("nan")
    with pytest.raises(
        ValueError,
        match=r"student_logits: 1 valid row\(s\) with NaN or \+inf "
        r"\(first: flattened row 4\)",
    ):
        opd_fast.opd_loss(student, teacher, k=8)
    teacher[2] = float("-inf")
    mask = torch.ones(6, dtype=torch.bool, device=DEVICE)
    mask[4] = False
    with pytest.raises(
        ValueError,
        match=r"teacher_logits: 1 valid row\(s\) with every entry is "
        r"-inf \(first: flattened row 2\)",
    ):
        opd_fast.opd_loss(student, teacher, k=8, mask=mask)
