"""Operator registration: torch.library.opcheck on the compiled ops (schema, autograd
registration, fake tensor kernels, AOT dispatch with dynamic shapes), and torch.compile with
fullgraph=True of the public opd_loss (loss and gradient equal eager).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, correlated_logits, dtype_id, random_mask, sampled_ids_from

import opd_fast
from opd_fast.op.kernels import sparse_is_gradient

pytestmark = pytest.mark.usefixtures("single_thread")

OPCHECK_TESTS = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_dynamic",
)

# (variant, estimator, k, temperature, with sampled_ids, with row_valid)
FORWARD_CONFIGS = [
    pytest.param("student_topk", "pg", 4, 1.0, False, False, id="student_topk-pg"),
    pytest.param("overlap_topk", "exact", 8, 0.7, True, True, id="overlap_topk-exact-ids-valid"),
    pytest.param("union_topk", "pg", 16, 1.3, False, True, id="union_topk-pg-valid"),
    pytest.param("full_vocab", "exact", 3, 1.0, True, False, id="full_vocab-exact-ids"),
    pytest.param("sampled_token", "pg", 6, 0.5, True, True, id="sampled_token-pg"),
]


def _forward_args(
    dtype, device, variant, estimator, k, temperature, with_ids, with_valid, requires_grad=True
):
    # Teacher close to the student: every row has a non-empty overlap, so no metric is NaN
    # (opcheck compares outputs with NaN != NaN; an empty overlap's advantage is NaN by design).
    student, teacher = correlated_logits((6, 50), seed=k, noise=0.3, dtype=dtype, device=device)
    student.requires_grad_(requires_grad)
    ids = sampled_ids_from(student) if with_ids else None
    valid = random_mask((6,), seed=k, device=device) if with_valid else None
    return (student, teacher, ids, valid, k, variant, estimator, temperature)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=dtype_id
)
@pytest.mark.parametrize(
    "variant, estimator, k, temperature, with_ids, with_valid", FORWARD_CONFIGS
)
def test_opcheck_forward(variant, estimator, k, temperature, with_ids, with_valid, dtype, device):
    args = _forward_args(dtype, device, variant, estimator, k, temperature, with_ids, with_valid)
    torch.library.opcheck(torch.ops.opd_fast.opd_forward.default, args, test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_forward_without_grad(device):
    args = _forward_args(
        torch.float32, device, "teacher_topk", "exact", 5, 1.0, False, False, requires_grad=False
    )
    torch.library.opcheck(torch.ops.opd_fast.opd_forward.default, args, test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize(
    "variant, estimator",
    [
        ("student_topk", "pg"),
        ("full_vocab", "pg"),
        ("sampled_token", "pg"),
        ("student_topk", "tail"),
    ],
)
def test_opcheck_backward(variant, estimator, dtype, device):
    args = _forward_args(
        dtype, device, variant, estimator, 4, 0.8, True, False, requires_grad=False
    )
    student, teacher = args[0], args[1]
    outputs = torch.ops.opd_fast.opd_forward(*args)
    _, _, _, _, grad_scale, sparse_id, sparse_coef, student_max, student_log_norm = outputs
    grad_loss = torch.randn(student.shape[0], dtype=student_max.dtype, device=device)
    backward_args = (
        grad_loss,
        student,
        teacher,
        student_max,
        student_log_norm,
        grad_scale,
        sparse_id,
        sparse_coef,
        0.8,
        variant == "full_vocab",
        sparse_is_gradient(estimator),
    )
    torch.library.opcheck(
        torch.ops.opd_fast.opd_backward.default, backward_args, test_utils=OPCHECK_TESTS
    )


def test_fake_kernels_match_real_outputs():
    """Shapes, dtypes and strides of the fake (meta) kernels equal the real kernels'."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        args = _forward_args(
            dtype, "cpu", "union_topk", "pg", 7, 1.0, True, True, requires_grad=False
        )
        real = torch.ops.opd_fast.opd_forward(*args)
        with FakeTensorMode() as mode:
            fake_args = tuple(
                mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args
            )
            fake = torch.ops.opd_fast.opd_forward(*fake_args)
        for index, (r, f) in enumerate(zip(real, fake)):
            assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride()), index


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# ---------------------------------------------------------------------------------------------


def _loss_and_metrics(student, teacher, mask, sampled_ids, k, variant, estimator, reduction):
    out = opd_fast.opd_loss(
        student,
        teacher,
        k=k,
        variant=variant,
        estimator=estimator,
        temperature=0.9,
        mask=mask,
        sampled_ids=sampled_ids,
        reduction=reduction,
        return_token_metrics=True,
    )
    return out.loss, out.metrics, out.token_metrics


COMPILE_CONFIGS = [
    pytest.param("student_topk", "pg", "token_mean", id="student_topk-pg-token_mean"),
    pytest.param("nonoverlap_topk", "exact", "seq_mean_token_sum", id="nonoverlap-exact-seq"),
    pytest.param("full_vocab", "pg", "sum", id="full_vocab-pg-sum"),
    pytest.param("sampled_token", "pg", "none", id="sampled_token-pg-none"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant, estimator, reduction", COMPILE_CONFIGS)
def test_compile_fullgraph_matches_eager(variant, estimator, reduction, device):
    torch._dynamo.reset()
    student, teacher = correlated_logits((2, 7, 300), seed=1, device=device)
    mask = random_mask((2, 7), seed=1, device=device)
    ids = sampled_ids_from(student)
    args = (mask, ids, 8, variant, estimator, reduction)

    eager_student = student.clone().requires_grad_(True)
    eager_loss, eager_metrics, eager_tokens = _loss_and_metrics(eager_student, teacher, *args)
    upstream = torch.rand_like(eager_loss)
    (eager_grad,) = torch.autograd.grad(eager_loss, eager_student, upstream)

    compiled = torch.compile(_loss_and_metrics, fullgraph=True, backend="aot_eager")
    compiled_student = student.clone().requires_grad_(True)
    loss, metrics, tokens = compiled(compiled_student, teacher, *args)
    (grad,) = torch.autograd.grad(loss, compiled_student, upstream)

    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-6, atol=1e-9)
    assert set(metrics) == set(eager_metrics)
    for name, value in eager_metrics.items():
        torch.testing.assert_close(metrics[name], value, rtol=1e-6, atol=1e-7, equal_nan=True)
    for name, value in eager_tokens.items():
        torch.testing.assert_close(tokens[name], value, rtol=1e-6, atol=1e-7, equal_nan=True)


@pytest.mark.slow
def test_compile_inductor_dynamic_shapes():
    """The default (inductor) backend with dynamic shapes: two different N and V, one graph."""
    torch._dynamo.reset()

    def loss_fn(student, teacher):
        return opd_fast.opd_loss(student, teacher, k=4, variant="union_topk").loss

    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=True)
    for rows, vocab in ((5, 64), (9, 100)):
        student, teacher = correlated_logits((rows, vocab), seed=rows)
        eager_student = student.clone().requires_grad_(True)
        compiled_student = student.clone().requires_grad_(True)
        eager = loss_fn(eager_student, teacher)
        result = compiled(compiled_student, teacher)
        eager.backward()
        result.backward()
        torch.testing.assert_close(result, eager, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(compiled_student.grad, eager_student.grad, rtol=1e-5, atol=1e-9)
