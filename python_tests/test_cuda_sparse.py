"""CUDA kernels of row_topk and the sparse-teacher forward (opd_forward_sparse).

Skipped without a GPU (or without opd_fast's CUDA kernels). row_topk on cuda must give the
cpu kernel's ids exactly (ties -> lower id, NaN rows filled with the lowest unused ids) and
its log-probs / log-partition / entropy within the accumulation precision; the sparse op on
cuda must equal the dense op on cuda and the sparse op on cpu (loss, gradients, metrics).
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    TOLERANCES,
    assert_close,
    correlated_logits,
    dtype_id,
    log_space_floor,
    random_mask,
    sampled_ids_from,
)

import opd_fast
from opd_fast.op import kernels, reference
from opd_fast.op.payload import payload_from_logits

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and opd_fast.build_info().get("with_cuda", False)),
        reason="needs a CUDA GPU and opd_fast built with its CUDA kernels",
    ),
]

DEVICE = "cuda"
ALL_DTYPES = [
    pytest.param(d, id=dtype_id(d))
    for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
]
SPARSE_VE = [
    pytest.param(v, e, id=f"{v}-{e}")
    for v in reference.VARIANTS
    if v != "full_vocab"
    for e in reference.ESTIMATORS
    if not (v == "sampled_token" and e == "exact")
]
INF, NAN = float("inf"), float("nan")


def _log_atol(dtype, logits, temperature):
    """Absolute tolerance of log-space values: fp32 accumulation with a different exp on each
    backend (ex2.approx in the GPU's streaming pass) plus the log-space rounding floor."""
    base = 1e-10 if dtype == torch.float64 else 2e-5
    return base + log_space_floor(logits, logits, temperature)


def _check_row_topk(logits, k, temperature):
    cpu = kernels.row_topk(logits, k, temperature)
    gpu = kernels.row_topk(logits.to(DEVICE), k, temperature)
    assert gpu.ids.device.type == DEVICE and gpu.ids.dtype == torch.int64
    assert gpu.ids.shape == (logits.shape[0], k)
    assert torch.equal(gpu.ids.cpu(), cpu.ids)
    atol = _log_atol(logits.dtype, logits, temperature)
    rtol = 1e-12 if logits.dtype == torch.float64 else 1e-5
    assert_close("log_probs", gpu.log_probs, cpu.log_probs, atol=atol, rtol=rtol)
    assert_close("lse", gpu.lse, cpu.lse, atol=atol, rtol=rtol)
    assert_close("entropy", gpu.entropy, cpu.entropy, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("k, vocab", [(1, 50), (5, 203), (33, 1000), (128, 4099)])
def test_row_topk_cuda_matches_cpu(dtype, k, vocab):
    logits, _ = correlated_logits((37, vocab), seed=k, dtype=dtype)
    _check_row_topk(logits, k, 0.7)
    # a strided view: rows with a padded stride and an unaligned start
    padded = torch.zeros(37, vocab + 3, dtype=dtype)
    padded[:, 1 : vocab + 1] = logits
    _check_row_topk(padded[:, 1 : vocab + 1], k, 1.3)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("k", [1, 5, 33, 128])
def test_row_topk_cuda_ties_neg_inf_nan(dtype, k):
    generator = torch.Generator().manual_seed(k)
    logits = torch.randint(-3, 3, (8, 300), generator=generator).to(dtype)  # many ties
    logits[1, ::2] = -INF
    logits[2, 3:] = -INF  # fewer than k finite entries
    logits[3, :] = -INF
    logits[4, 7] = NAN
    logits[5, :] = NAN  # all NaN: filled with ids 0..k-1, valued NaN
    logits[6, 10:] = NAN  # NaN leaves fewer than k orderable entries
    logits[7, ::2] = -0.0
    _check_row_topk(logits, k, 1.0)


def _payload(student, teacher, k, temperature, sampled):
    requested = kernels.row_topk(student, k, temperature).ids
    return payload_from_logits(teacher, requested, k, temperature, sampled)


def _run(student, teacher, **kwargs):
    student = student.detach().clone().requires_grad_(True)
    out = opd_fast.opd_loss(student, teacher, return_token_metrics=True, reduction="none", **kwargs)
    (grad,) = torch.autograd.grad(out.loss, student, torch.ones_like(out.loss))
    return out, grad


def _compare(name, a, a_grad, b, b_grad, dtype, floor):
    tol = TOLERANCES[dtype]
    assert_close(f"{name} loss", a.loss, b.loss, atol=tol.rows_atol + floor, rtol=tol.rows_rtol)
    grad_scale = float(b_grad.double().abs().max())
    if dtype in (torch.bfloat16, torch.float16):  # one rounding of each side to the dtype
        grad_atol = 2 * torch.finfo(dtype).eps * grad_scale
    else:
        grad_atol = tol.grad_rtol * grad_scale + tol.grad_atol
    assert_close(f"{name} grad", a_grad, b_grad, atol=grad_atol + 4 * floor)
    for metric, value in b.token_metrics.items():
        assert_close(
            f"{name} {metric}",
            a.token_metrics[metric],
            value,
            atol=tol.rows_atol + floor,
            rtol=tol.rows_rtol,
        )


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("variant, estimator", SPARSE_VE)
def test_sparse_cuda_equals_dense_cuda_and_sparse_cpu(variant, estimator, dtype):
    k, temperature = 16, 0.8
    student, teacher = correlated_logits((2, 9, 3001), seed=3, dtype=dtype)
    mask = random_mask((2, 9), seed=3)
    sampled = sampled_ids_from(student)
    flat_student, flat_teacher = student.reshape(-1, 3001), teacher.reshape(-1, 3001)
    settings = dict(k=k, variant=variant, estimator=estimator, temperature=temperature)
    floor = log_space_floor(student, teacher, temperature)

    # cuda: sparse (payload computed on cuda) against dense
    gpu_student, gpu_teacher = student.to(DEVICE), teacher.to(DEVICE)
    gpu_settings = dict(settings, mask=mask.to(DEVICE), sampled_ids=sampled.to(DEVICE))
    gpu_payload = _payload(
        flat_student.to(DEVICE),
        flat_teacher.to(DEVICE),
        k,
        temperature,
        sampled.reshape(-1).to(DEVICE),
    ).map(lambda t: t.reshape(2, 9, *t.shape[1:]))
    dense, dense_grad = _run(gpu_student, gpu_teacher, **gpu_settings)
    sparse, sparse_grad = _run(gpu_student, gpu_payload, **gpu_settings)
    assert sparse_grad.device.type == DEVICE and sparse_grad.dtype == dtype
    _compare("cuda sparse vs dense", sparse, sparse_grad, dense, dense_grad, dtype, floor)

    # the same payload values on both backends
    cpu_payload = _payload(flat_student, flat_teacher, k, temperature, sampled.reshape(-1)).map(
        lambda t: t.reshape(2, 9, *t.shape[1:])
    )
    cpu_settings = dict(settings, mask=mask, sampled_ids=sampled)
    cpu, cpu_grad = _run(student, cpu_payload, **cpu_settings)
    gpu, gpu_grad = _run(gpu_student, cpu_payload.map(lambda t: t.to(DEVICE)), **gpu_settings)
    _compare("sparse cuda vs cpu", gpu, gpu_grad, cpu, cpu_grad, dtype, floor)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_sparse_op_cuda_matches_cpu_edge_rows(dtype):
    """The raw op on rows with -inf, NaN, out-of-range payload ids and sampled ids, and
    row_valid: the same outputs as the cpu kernel (NaN where the cpu has NaN)."""
    k, vocab = 16, 120
    generator = torch.Generator().manual_seed(9)
    student = torch.randn(6, vocab, generator=generator).to(dtype)
    teacher = torch.randn(6, vocab, generator=generator).to(dtype)
    student[1, ::2] = -INF
    student[2, 7] = NAN
    student[3, :] = -INF
    student[4, :] = NAN
    sampled = torch.tensor([0, vocab - 1, -1, vocab, 5, 3])
    payload = _payload(student, teacher, k, 1.0, sampled.clamp(0, vocab - 1))
    requested = payload.requested_ids.clone()
    topk_ids = payload.topk_ids.clone()
    requested[0, 3], requested[0, 4] = vocab, -5
    topk_ids[0, 0], topk_ids[2, 5], topk_ids[3, 1] = 10**12, -1, vocab
    valid = torch.tensor([True, True, True, True, True, False])
    args = [
        requested,
        topk_ids,
        payload.topk_log_probs,
        payload.requested_log_probs,
        payload.entropy,
        sampled,
        payload.sampled_log_probs,
        valid,
    ]
    floor = log_space_floor(student.nan_to_num(nan=0.0), teacher, 1.0)
    tol = TOLERANCES[dtype]
    for variant, estimator in [
        ("union_topk", "exact"),
        ("teacher_topk", "pg"),
        ("sampled_token", "pg"),
    ]:
        cpu = kernels.opd_forward_sparse(student, *args, k, variant, estimator, 1.0)
        gpu = kernels.opd_forward_sparse(
            student.to(DEVICE), *[a.to(DEVICE) for a in args], k, variant, estimator, 1.0
        )
        for name in ("loss", "metrics", "student_lse", "teacher_lse", "grad_scale", "sparse_coef"):
            assert_close(
                f"{variant} {name}",
                getattr(gpu, name),
                getattr(cpu, name),
                atol=tol.rows_atol + floor,
                rtol=tol.rows_rtol,
            )
        assert torch.equal(gpu.sparse_id.cpu(), cpu.sparse_id)
