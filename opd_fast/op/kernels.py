"""The Python face of the compiled kernels: typed wrappers, fake (meta) kernels, autograd.

torch.ops.opd_fast.opd_forward streams both (N, V) logits once and returns per-row results;
torch.ops.opd_fast.opd_backward turns them into d loss / d student_logits in one pass.
Registering fake kernels and autograd here makes the pair work under torch.compile
(fullgraph) and pass torch.library.opcheck.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from opd_fast.op._extension import extension_available
from opd_fast.op.names import MAX_K, TOKEN_METRIC_NAMES

NUM_METRICS = len(TOKEN_METRIC_NAMES)


def sparse_is_gradient(estimator: str) -> bool:
    """How opd_backward reads sparse_coef: the listed entries' whole gradient (tail, whose
    dominant entries would lose their digits as p * C - coef), else a correction subtracted
    from the dense p * C (csrc/kernels/row_loss.h)."""
    return estimator == "tail"


class ForwardResult(NamedTuple):
    loss: torch.Tensor  # (N,) per-row loss L_t, differentiable w.r.t. student_logits
    metrics: torch.Tensor  # (N, NUM_METRICS) in TOKEN_METRIC_NAMES order
    student_lse: torch.Tensor  # (N,) log sum exp(z / tau)
    teacher_lse: torch.Tensor  # (N,) log sum exp(u / tau)
    grad_scale: torch.Tensor  # (N,) C of the gradient (csrc/kernels/row_loss.h)
    sparse_id: torch.Tensor  # (N, 2k) int64, -1 where unused
    sparse_coef: torch.Tensor  # (N, 2k); see sparse_is_gradient
    # log p = (z - student_max) / tau - student_log_norm: the shifted form the backward reads,
    # exact where z / tau is too large for student_lse to keep log_norm's digits.
    student_max: torch.Tensor  # (N,) max_j z_j, raw logits
    student_log_norm: torch.Tensor  # (N,) log sum_j exp((z_j - student_max) / tau)


def _accumulation_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


class ForwardInputs(NamedTuple):
    """The inputs of torch.ops.opd_fast.opd_forward, by name (its schema's order)."""

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    sampled_ids: torch.Tensor | None
    row_valid: torch.Tensor | None
    k: int
    variant: str
    estimator: str
    temperature: float


class SparseForwardInputs(NamedTuple):
    """The inputs of torch.ops.opd_fast.opd_forward_sparse, by name (its schema's order)."""

    student_logits: torch.Tensor
    student_topk_ids: torch.Tensor
    teacher_topk_ids: torch.Tensor
    teacher_topk_log_probs: torch.Tensor
    teacher_log_probs_at_student: torch.Tensor
    teacher_entropy: torch.Tensor
    sampled_ids: torch.Tensor | None
    teacher_sampled_log_probs: torch.Tensor | None
    row_valid: torch.Tensor | None
    k: int
    variant: str
    estimator: str
    temperature: float


def input_gradients(inputs: type[NamedTuple], **gradients) -> tuple:
    """A backward's return value: one entry per input of `inputs`, None but those named."""
    return tuple(gradients.get(name) for name in inputs._fields)


def opd_forward(*args, **kwargs) -> ForwardResult:
    """The fused forward over student and teacher logits (N, V), with the arguments of
    ForwardInputs: sampled_ids (N,) int64 or None, row_valid (N,) bool or None, k, variant,
    estimator, temperature."""
    return ForwardResult(*torch.ops.opd_fast.opd_forward(*ForwardInputs(*args, **kwargs)))


def opd_forward_sparse(*args, **kwargs) -> ForwardResult:
    """opd_forward with the teacher as a payload of (N, k) / (N,) arrays instead of (N, V)
    logits, with the arguments of SparseForwardInputs."""
    return ForwardResult(
        *torch.ops.opd_fast.opd_forward_sparse(*SparseForwardInputs(*args, **kwargs))
    )


class RowTopk(NamedTuple):
    ids: torch.Tensor  # (N, k) int64, by (value desc, id asc)
    log_probs: torch.Tensor  # (N, k) log softmax(logits / tau) at ids
    lse: torch.Tensor  # (N,) log sum exp(logits / tau)
    entropy: torch.Tensor  # (N,)


def row_topk(logits: torch.Tensor, k: int, temperature: float = 1.0) -> RowTopk:
    """Exact top-k of each row of logits (N, V) (ties -> lower id), ranked on the raw values,
    with log-probs at temperature tau, log-partition and entropy, in one streaming pass."""
    return RowTopk(*torch.ops.opd_fast.row_topk(logits, k, float(temperature)))


if extension_available():

    def _forward_outputs_fake(student_logits, k):
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
            new((rows,), dtype=acc),
            new((rows,), dtype=acc),
        )

    @torch.library.register_fake("opd_fast::opd_forward")
    def _opd_forward_fake(
        student_logits, teacher_logits, sampled_ids, row_valid, k, variant, estimator, temperature
    ):
        # The checks of plan_forward (csrc/launchers/checks.h) that decide the output shapes
        # and devices: a meta tensor mixed with cpu ones dispatches here, which must not return
        # empty (uninitialised) cpu tensors for inputs that the real kernel refuses.
        torch._check(student_logits.dim() == 2, lambda: "opd_fast: student_logits must be (N, V)")
        torch._check(
            teacher_logits.shape == student_logits.shape,
            lambda: (
                f"opd_fast: teacher_logits shape {tuple(teacher_logits.shape)} != "
                f"student_logits shape {tuple(student_logits.shape)}"
            ),
        )
        for name, tensor in (
            ("teacher_logits", teacher_logits),
            ("sampled_ids", sampled_ids),
            ("row_valid", row_valid),
        ):
            torch._check(
                tensor is None or tensor.device == student_logits.device,
                lambda name=name, tensor=tensor: (
                    f"opd_fast: {name} on {tensor.device} but "
                    f"student_logits on {student_logits.device}"
                ),
            )
        torch._check(
            teacher_logits.dtype == student_logits.dtype,
            lambda: (
                f"opd_fast: teacher_logits dtype {teacher_logits.dtype} != student_logits "
                f"dtype {student_logits.dtype}"
            ),
        )
        for k_fits in (1 <= k, k <= MAX_K, k <= student_logits.shape[1]):
            torch._check(
                k_fits,
                lambda: (
                    f"opd_fast: k must be in [1, min(V, {MAX_K})], got k={k} with "
                    f"V={student_logits.shape[1]}"
                ),
            )
        return _forward_outputs_fake(student_logits, k)

    @torch.library.register_fake("opd_fast::opd_forward_sparse")
    def _opd_forward_sparse_fake(
        student_logits,
        student_topk_ids,
        teacher_topk_ids,
        teacher_topk_log_probs,
        teacher_log_probs_at_student,
        teacher_entropy,
        sampled_ids,
        teacher_sampled_log_probs,
        row_valid,
        k,
        variant,
        estimator,
        temperature,
    ):
        return _forward_outputs_fake(student_logits, k)

    @torch.library.register_fake("opd_fast::row_topk")
    def _row_topk_fake(logits, k, temperature):
        rows, acc = logits.shape[0], _accumulation_dtype(logits.dtype)
        return (
            logits.new_empty((rows, k), dtype=torch.int64),
            logits.new_empty((rows, k), dtype=acc),
            logits.new_empty((rows,), dtype=acc),
            logits.new_empty((rows,), dtype=acc),
        )

    @torch.library.register_fake("opd_fast::opd_backward")
    def _opd_backward_fake(
        grad_loss,
        student_logits,
        teacher_logits,
        student_max,
        student_log_norm,
        grad_scale,
        sparse_id,
        sparse_coef,
        temperature,
        full_vocab,
        sparse_is_gradient,
    ):
        return torch.empty_like(student_logits, memory_format=torch.contiguous_format)

    def _save_for_backward(
        ctx, student_logits, teacher_logits, output, temperature, full_vocab, estimator
    ):
        result = ForwardResult(*output)
        ctx.save_for_backward(
            student_logits,
            teacher_logits,
            result.student_max,
            result.student_log_norm,
            result.grad_scale,
            result.sparse_id,
            result.sparse_coef,
        )
        ctx.temperature = temperature
        ctx.full_vocab = full_vocab
        ctx.sparse_is_gradient = sparse_is_gradient(estimator)
        ctx.mark_non_differentiable(*result[1:])

    def _grad_student(ctx, grad_loss):
        student_logits, teacher_logits, student_max, *rest = ctx.saved_tensors
        if grad_loss is None:
            grad_loss = torch.zeros_like(student_max)
        return torch.ops.opd_fast.opd_backward(
            grad_loss.contiguous(),
            student_logits,
            teacher_logits,
            student_max,
            *rest,
            ctx.temperature,
            ctx.full_vocab,
            ctx.sparse_is_gradient,
        )

    def _setup_context(ctx, inputs, output):
        args = ForwardInputs(*inputs)
        _save_for_backward(
            ctx,
            args.student_logits,
            args.teacher_logits,
            output,
            args.temperature,
            args.variant == "full_vocab",
            args.estimator,
        )

    def _backward(ctx, grad_loss, *unused_grads):
        return input_gradients(ForwardInputs, student_logits=_grad_student(ctx, grad_loss))

    torch.library.register_autograd(
        "opd_fast::opd_forward", _backward, setup_context=_setup_context
    )

    def _setup_context_sparse(ctx, inputs, output):
        args = SparseForwardInputs(*inputs)
        # The backward never reads the teacher for non-full_vocab variants: pass the student.
        _save_for_backward(
            ctx,
            args.student_logits,
            args.student_logits,
            output,
            args.temperature,
            False,
            args.estimator,
        )

    def _backward_sparse(ctx, grad_loss, *unused_grads):
        return input_gradients(SparseForwardInputs, student_logits=_grad_student(ctx, grad_loss))

    torch.library.register_autograd(
        "opd_fast::opd_forward_sparse", _backward_sparse, setup_context=_setup_context_sparse
    )
