"""Typed wrappers of the compiled ops, their fake (meta) kernels and autograd registration.

torch.ops.opd_fast.opd_forward streams both (N, V) logits once and returns per-row results;
torch.ops.opd_fast.opd_backward turns them into d loss / d student_logits in one pass.
Registering fake kernels and autograd here makes the pair work under torch.compile
(fullgraph) and pass torch.library.opcheck.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from opd_fast._extension import extension_available
from opd_fast.reference import TOKEN_METRIC_NAMES

NUM_METRICS = len(TOKEN_METRIC_NAMES)
MAX_K = 128  # kMaxK in csrc/include/opd_fast/row_loss.h


class ForwardResult(NamedTuple):
    loss: torch.Tensor  # (N,) per-row loss L_t, differentiable w.r.t. student_logits
    metrics: torch.Tensor  # (N, NUM_METRICS) in TOKEN_METRIC_NAMES order
    student_lse: torch.Tensor  # (N,) log sum exp(z / tau)
    teacher_lse: torch.Tensor  # (N,) log sum exp(u / tau)
    grad_scale: torch.Tensor  # (N,) C of the gradient convention in row_loss.h
    sparse_id: torch.Tensor  # (N, 2k) int64, -1 where unused
    sparse_coef: torch.Tensor  # (N, 2k)


def _accumulation_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def opd_forward(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    sampled_ids: torch.Tensor | None,
    row_valid: torch.Tensor | None,
    k: int,
    variant: str,
    estimator: str,
    temperature: float,
) -> ForwardResult:
    """student_logits, teacher_logits: (N, V); sampled_ids: (N,) int64; row_valid: (N,) bool."""
    outputs = torch.ops.opd_fast.opd_forward(
        student_logits, teacher_logits, sampled_ids, row_valid, k, variant, estimator, temperature
    )
    return ForwardResult(*outputs)


if extension_available():

    @torch.library.register_fake("opd_fast::opd_forward")
    def _opd_forward_fake(
        student_logits, teacher_logits, sampled_ids, row_valid, k, variant, estimator, temperature
    ):
        rows = student_logits.shape[0]
        acc = _accumulation_dtype(student_logits.dtype)
        new = student_logits.new_empty
        return (
            new((rows,), dtype=acc),
            new((rows, NUM_METRICS), dtype=acc),
            new((rows,), dtype=acc),
            new((rows,), dtype=acc),
            new((rows,), dtype=acc),
            new((rows, 2 * k), dtype=torch.int64),
            new((rows, 2 * k), dtype=acc),
        )

    @torch.library.register_fake("opd_fast::opd_backward")
    def _opd_backward_fake(
        grad_loss,
        student_logits,
        teacher_logits,
        student_lse,
        grad_scale,
        sparse_id,
        sparse_coef,
        temperature,
        full_vocab,
    ):
        return torch.empty_like(student_logits, memory_format=torch.contiguous_format)

    def _setup_context(ctx, inputs, output):
        student_logits, teacher_logits, _, _, _, variant, _, temperature = inputs
        _, metrics, student_lse, teacher_lse, grad_scale, sparse_id, sparse_coef = output
        ctx.save_for_backward(
            student_logits, teacher_logits, student_lse, grad_scale, sparse_id, sparse_coef
        )
        ctx.temperature = temperature
        ctx.full_vocab = variant == "full_vocab"
        ctx.mark_non_differentiable(
            metrics, student_lse, teacher_lse, grad_scale, sparse_id, sparse_coef
        )

    def _backward(ctx, grad_loss, *unused_grads):
        student_logits, teacher_logits, student_lse, grad_scale, sparse_id, sparse_coef = (
            ctx.saved_tensors
        )
        if grad_loss is None:
            grad_loss = torch.zeros_like(student_lse)
        grad_student = torch.ops.opd_fast.opd_backward(
            grad_loss.contiguous(),
            student_logits,
            teacher_logits,
            student_lse,
            grad_scale,
            sparse_id,
            sparse_coef,
            ctx.temperature,
            ctx.full_vocab,
        )
        return grad_student, None, None, None, None, None, None, None

    torch.library.register_autograd(
        "opd_fast::opd_forward", _backward, setup_context=_setup_context
    )
