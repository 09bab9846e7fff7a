"""Fused linear OPD: the loss straight from hidden states, the (N, V) logits never whole.

`linear_opd_loss(student_hidden, student_weight, teacher, ...)` equals
`opd_loss(student_hidden @ student_weight[:vocab].T (+ bias), teacher, ...)` (loss, metrics,
token metrics, gradients w.r.t. hidden, weight and bias) but walks the tokens in chunks: per
chunk it forms the student logits (and a `LinearTeacher`'s), runs the fused op's forward and
backward kernels on them, and turns the logits' gradient g at once into
grad_hidden[chunk] = g @ W and grad_W += g.T @ h. Peak extra memory is O(chunk x V) plus the
weight gradient, whatever N is (the chunk comes from CHUNK_MEMORY_BYTES, see
`default_chunk_tokens`).

For a scalar reduction the gradients are computed in the forward, already weighted by the
reduction (Liger's fused linear losses do the same), and the backward only scales them by
grad_output: no GEMM is repeated. reduction='none' cannot know the per-token upstream
gradient in advance: its backward runs the chunked pass again with it.

The op is `torch.ops.opd_fast.linear_opd_forward`, a torch.library custom op with a fake
kernel and autograd, so torch.compile treats it as one opaque node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_fast.op import kernels
from opd_fast.op._extension import require_extension
from opd_fast.op.loss import OPDLossOutput, _check_arguments, _check_values, _mean_metrics
from opd_fast.op.names import LOGITS_DTYPES, NEEDS_TEACHER_LOGITS, TOKEN_METRIC_NAMES
from opd_fast.op.payload import TeacherPayload
from opd_fast.op.reference import reduce_rows

# The working memory a chunk may use: its student logits, their gradient and (for a
# LinearTeacher) the teacher's logits, each (chunk, vocab) in the hidden states' dtype.
# 256 MiB is 220 tokens at V = 151,936 in fp32 with teacher logits given (147 with a
# LinearTeacher): enough rows for the GEMMs to run at full speed, and a small fraction of
# the (N, V) tensors it replaces.
CHUNK_MEMORY_BYTES = 256 * 2**20

_PAYLOAD_FIELDS = ("requested_ids", "topk_ids", "topk_log_probs", "requested_log_probs", "entropy")


@dataclass(frozen=True)
class LinearTeacher:
    """A teacher given by its final hidden states and output layer, scored chunk by chunk.

    hidden: (N, H_t) or (B, T, H_t), the same leading dims as the student's hidden states.
    weight: (V_t_rows, H_t), the teacher's lm_head weight (its first `vocab` rows are used).
    bias: (V_t_rows,) or None.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None


def default_chunk_tokens(
    vocab: int, dtype: torch.dtype, linear_teacher: bool, budget: int = CHUNK_MEMORY_BYTES
) -> int:
    """Tokens per chunk so that the chunk's (chunk, vocab) tensors fit in `budget` bytes."""
    tensors_per_token = 3 if linear_teacher else 2
    per_token = vocab * torch.empty((), dtype=dtype).element_size() * tensors_per_token
    return max(1, budget // per_token)


# ---------------------------------------------------------------------------------------------
# The chunked pass (the custom op's body)
# ---------------------------------------------------------------------------------------------


def _logits(hidden, weight, bias, vocab):
    """(c, H) @ (vocab, H).T (+ bias) -> (c, vocab) in the hidden states' dtype."""
    if bias is None:
        return torch.mm(hidden, weight[:vocab].t())
    return torch.addmm(bias[:vocab], hidden, weight[:vocab].t())


@torch.library.custom_op("opd_fast::linear_opd_forward", mutates_args=())
def linear_opd_forward(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    payload: list[torch.Tensor],
    teacher_sampled_log_probs: torch.Tensor | None,
    sampled_ids: torch.Tensor | None,
    row_valid: torch.Tensor | None,
    row_weight: torch.Tensor | None,
    vocab: int,
    k: int,
    variant: str,
    estimator: str,
    temperature: float,
    chunk_tokens: int,
    compute_grad: bool,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """One chunked pass over N tokens.

    student_hidden: (N, H); student_weight: (V_rows, H); student_bias: (V_rows,) or None.
    The teacher is one of: teacher_logits (N, vocab); teacher_hidden (N, H_t) with
    teacher_weight (V_t_rows, H_t) and teacher_bias; payload, the five (N, k) / (N,) arrays
    of a TeacherPayload in _PAYLOAD_FIELDS order (accumulation dtype; ids int64) with
    teacher_sampled_log_probs (N,).
    row_weight: (N,) accumulation dtype, d loss / d loss_rows (zero where not valid).

    Returns loss = sum(row_weight * loss_rows) (0 when row_weight is None), loss_rows (N,),
    metrics (N, M), student_lse (N,), teacher_lse (N,), and when compute_grad the gradients
    of loss w.r.t. student_hidden (N, H), student_weight (V_rows, H) and student_bias
    (V_rows,) (dtype of each input; shape (0,) otherwise).
    """
    rows, dtype, device = student_hidden.shape[0], student_hidden.dtype, student_hidden.device
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    loss_rows = torch.empty(rows, dtype=acc, device=device)
    metrics = torch.empty(rows, len(TOKEN_METRIC_NAMES), dtype=acc, device=device)
    student_lse = torch.empty(rows, dtype=acc, device=device)
    teacher_lse = torch.empty(rows, dtype=acc, device=device)
    compute_grad = compute_grad and row_weight is not None
    weight_rows = student_weight[:vocab]
    if compute_grad:
        grad_hidden = torch.empty_like(student_hidden)
        # A low-precision weight gradient summed over several chunks is summed in fp32 (one
        # rounding at the end, as the materialised path's single GEMM has).
        sum_dtype = dtype if rows <= chunk_tokens else acc
        grad_weight = torch.empty(student_weight.shape, dtype=sum_dtype, device=device)
        # Padded rows (no logit) get no gradient; with no tokens, no row does.
        grad_weight[vocab if rows else 0 :].zero_()
        grad_bias = torch.zeros(student_weight.shape[0], dtype=acc, device=device)
    for start in range(0, rows, chunk_tokens):
        end = min(start + chunk_tokens, rows)
        hidden = student_hidden[start:end]
        student = _logits(hidden, student_weight, student_bias, vocab)
        ids = None if sampled_ids is None else sampled_ids[start:end]
        valid = None if row_valid is None else row_valid[start:end]
        if payload:
            teacher = None
            result = kernels.opd_forward_sparse(
                student,
                *(tensor[start:end] for tensor in payload),
                ids,
                None if teacher_sampled_log_probs is None else teacher_sampled_log_probs[start:end],
                valid,
                k,
                variant,
                estimator,
                temperature,
            )
        else:
            if teacher_logits is not None:
                teacher = teacher_logits[start:end]
            else:
                teacher = _logits(teacher_hidden[start:end], teacher_weight, teacher_bias, vocab)
            result = kernels.opd_forward(
                student, teacher, ids, valid, k, variant, estimator, temperature
            )
        loss_rows[start:end] = result.loss
        metrics[start:end] = result.metrics
        student_lse[start:end] = result.student_lse
        teacher_lse[start:end] = result.teacher_lse
        if not compute_grad:
            continue
        grad_logits = torch.ops.opd_fast.opd_backward(
            row_weight[start:end].contiguous(),
            student,
            student if teacher is None else teacher,  # read only for full_vocab
            result.student_max,
            result.student_log_norm,
            result.grad_scale,
            result.sparse_id,
            result.sparse_coef,
            temperature,
            variant in NEEDS_TEACHER_LOGITS,
        )
        del student, teacher
        torch.mm(grad_logits, weight_rows, out=grad_hidden[start:end])
        if start == 0 and sum_dtype == dtype:
            torch.mm(grad_logits.t(), hidden, out=grad_weight[:vocab])
        elif start == 0:
            grad_weight[:vocab].copy_(torch.mm(grad_logits.t(), hidden))
        elif sum_dtype == dtype:
            grad_weight[:vocab].addmm_(grad_logits.t(), hidden)
        else:
            grad_weight[:vocab] += torch.mm(grad_logits.t(), hidden)
        if student_bias is not None:
            grad_bias[:vocab] += grad_logits.sum(0, dtype=acc)
        del grad_logits
    valid_rows = (
        torch.ones(rows, dtype=torch.bool, device=device) if row_valid is None else row_valid
    )
    masked = torch.where(valid_rows, loss_rows, torch.zeros_like(loss_rows))
    loss = masked.new_zeros(()) if row_weight is None else (masked * row_weight.to(acc)).sum()
    if not compute_grad:
        empty = student_hidden.new_empty((0,))
        return (
            loss,
            loss_rows,
            metrics,
            student_lse,
            teacher_lse,
            empty,
            empty.clone(),
            empty.clone(),
        )
    bias_dtype = dtype if student_bias is None else student_bias.dtype
    return (
        loss,
        loss_rows,
        metrics,
        student_lse,
        teacher_lse,
        grad_hidden,
        grad_weight.to(student_weight.dtype),
        grad_bias.to(bias_dtype),
    )


@linear_opd_forward.register_fake
def _linear_opd_forward_fake(student_hidden, student_weight, student_bias, *teacher_and_settings):
    row_weight, compute_grad = teacher_and_settings[8], teacher_and_settings[-1]
    rows, dtype = student_hidden.shape[0], student_hidden.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    new = student_hidden.new_empty
    per_row = (
        new((), dtype=acc),
        new((rows,), dtype=acc),
        new((rows, len(TOKEN_METRIC_NAMES)), dtype=acc),
        new((rows,), dtype=acc),
        new((rows,), dtype=acc),
    )
    if not (compute_grad and row_weight is not None):
        return per_row + (new((0,)), new((0,)), new((0,)))
    bias_dtype = dtype if student_bias is None else student_bias.dtype
    return per_row + (
        torch.empty_like(student_hidden),
        torch.empty_like(student_weight),
        new((student_weight.shape[0],), dtype=bias_dtype),
    )


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, payload, t_sampled) = inputs[:9]
    sampled_ids, row_valid, row_weight = inputs[9:12]
    ctx.settings = inputs[12:18]  # vocab, k, variant, estimator, temperature, chunk_tokens
    ctx.eager = inputs[18] and row_weight is not None
    ctx.has_bias = bias is not None
    ctx.num_payload = len(payload)
    grad_hidden, grad_weight, grad_bias = output[5:]
    # Unused outputs (the per-token loss of a scalar reduction) get no gradient, so the
    # backward can tell which pass it needs.
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[2:])  # metrics, log-partitions, gradients
    ctx.save_for_backward(
        hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, t_sampled,
        sampled_ids, row_valid, grad_hidden, grad_weight, grad_bias, *payload,
    )  # fmt: skip


def _backward(ctx, grad_loss, grad_loss_rows, *unused_grads):
    saved = ctx.saved_tensors
    hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, t_sampled = saved[:8]
    sampled_ids, row_valid, grad_hidden, grad_weight, grad_bias = saved[8:13]
    payload = list(saved[13:])
    grads = [None, None, None]
    if grad_loss is not None and ctx.eager:
        grads = [grad_loss * grad_hidden, grad_loss * grad_weight, grad_loss * grad_bias]
    if grad_loss_rows is not None:
        # reduction='none': the upstream gradient per token is known only now.
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        again = torch.ops.opd_fast.linear_opd_forward(
            hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, payload, t_sampled,
            sampled_ids, row_valid, grad_loss_rows.to(acc), *ctx.settings, True,
        )  # fmt: skip
        grads = [again[5 + i] if g is None else g + again[5 + i] for i, g in enumerate(grads)]
    if not ctx.has_bias:
        grads[2] = None
    # One entry per input: the teacher's four, the payload list, the remaining eleven.
    return (*grads, None, None, None, None, [None] * ctx.num_payload) + (None,) * 11


linear_opd_forward.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# The public function: argument checks, flattening, reductions, metrics
# ---------------------------------------------------------------------------------------------


def _stand_in_logits(hidden: torch.Tensor, vocab: int) -> torch.Tensor:
    """A zero-memory tensor shaped, typed and placed like the logits hidden @ W[:vocab].T, so
    that opd_loss's own argument checks (and their messages) apply unchanged."""
    return hidden.new_empty(()).expand(*hidden.shape[:-1], vocab)


def _check_linear(name: str, hidden, weight, bias, vocab) -> None:
    """hidden (..., H), weight (V_rows, H), bias (V_rows,): types, shapes, dtypes, devices."""
    for part, tensor in ((f"{name}_hidden", hidden), (f"{name}_weight", weight)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{part} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in LOGITS_DTYPES:
            raise TypeError(
                f"{part} must be float32, bfloat16, float16 or float64, got {tensor.dtype}"
            )
    if hidden.dim() not in (2, 3):
        raise ValueError(f"{name}_hidden must be (N, H) or (B, T, H), got {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{name}_weight must be (V_rows, H), got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"hidden size mismatch: {name}_hidden has H={hidden.shape[-1]}, {name}_weight "
            f"{tuple(weight.shape)} has H={weight.shape[1]}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"dtype mismatch: {name}_hidden is {hidden.dtype}, {name}_weight is {weight.dtype}"
        )
    if weight.device != hidden.device:
        raise ValueError(
            f"device mismatch: {name}_hidden on {hidden.device}, {name}_weight on {weight.device}"
        )
    if vocab > weight.shape[0]:
        raise ValueError(f"vocab={vocab} is larger than {name}_weight's {weight.shape[0]} rows")
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{name}_bias must be a torch.Tensor, got {type(bias).__name__}")
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"{name}_bias must be ({weight.shape[0]},) like {name}_weight's rows, got "
            f"{tuple(bias.shape)}"
        )
    if bias.dtype != weight.dtype or bias.device != weight.device:
        raise ValueError(
            f"{name}_bias is {bias.dtype} on {bias.device}, {name}_weight {weight.dtype} on "
            f"{weight.device}: they must agree"
        )


def _check_vocab(vocab, weight_rows: int) -> int:
    if vocab is None:
        return weight_rows
    if isinstance(vocab, bool) or not isinstance(vocab, int):
        raise TypeError(f"vocab must be an int, got {type(vocab).__name__}")
    if vocab < 1:
        raise ValueError(f"vocab must be at least 1, got {vocab}")
    return vocab


def _row_weight(valid, reduction, batch_shape, dtype):
    """d loss / d loss_rows of a scalar reduction (docs/math.md, Reductions)."""
    weights = valid.to(dtype)
    if reduction == "token_mean":
        return weights / weights.sum().clamp_min(1)
    if reduction == "seq_mean_token_sum":
        return weights / batch_shape[0]
    return weights  # sum


def linear_opd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher: torch.Tensor | TeacherPayload | LinearTeacher,
    *,
    student_bias: torch.Tensor | None = None,
    vocab: int | None = None,
    k: int = 16,
    variant: str = "student_topk",
    estimator: str = "pg",
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    sampled_ids: torch.Tensor | None = None,
    reduction: str = "token_mean",
    chunk_tokens: int | None = None,
    return_token_metrics: bool = False,
    check_values: bool = True,
) -> OPDLossOutput:
    """opd_loss of the logits student_hidden @ student_weight[:vocab].T (+ student_bias), without
    ever forming them (or their gradient) for all tokens at once.

    student_hidden: (N, H) or (B, T, H); student_weight: (V_rows, H), the lm_head weight (tied
      embeddings too); student_bias: (V_rows,) or None. Gradients flow to all three.
    vocab: use the first `vocab` rows only (the vocabulary both models share when their
      tables are padded differently); default all of student_weight's rows.
    teacher: teacher logits (N, vocab) / (B, T, vocab) in the student's dtype, a
      TeacherPayload, or a LinearTeacher(hidden, weight, bias) whose logits are formed chunk
      by chunk too. No gradient flows to the teacher.
    chunk_tokens: tokens per chunk; default default_chunk_tokens(vocab, ...), which keeps the
      chunk's (chunk, vocab) tensors within CHUNK_MEMORY_BYTES.
    Every other argument, and the output, as opd_fast.opd_loss. reduction='none' runs the
    chunked pass a second time in the backward (the other reductions compute the gradient in
    the forward).
    """
    _check_linear("student", student_hidden, student_weight, student_bias, 0)
    vocab = _check_vocab(vocab, student_weight.shape[0])
    _check_linear("student", student_hidden, student_weight, student_bias, vocab)
    linear_teacher = isinstance(teacher, LinearTeacher)
    if linear_teacher:
        _check_linear("teacher", teacher.hidden, teacher.weight, teacher.bias, vocab)
        if teacher.hidden.shape[:-1] != student_hidden.shape[:-1]:
            raise ValueError(
                f"shape mismatch: student_hidden {tuple(student_hidden.shape)} vs teacher "
                f"hidden {tuple(teacher.hidden.shape)}: they must share the leading dims"
            )
        checked_teacher = _stand_in_logits(teacher.hidden, vocab)
    elif isinstance(teacher, (torch.Tensor, TeacherPayload)):
        checked_teacher = teacher
    else:
        raise TypeError(
            "teacher must be teacher logits (a torch.Tensor), a TeacherPayload or a "
            f"LinearTeacher, got {type(teacher).__name__}"
        )
    _check_arguments(
        _stand_in_logits(student_hidden, vocab),
        checked_teacher,
        k,
        variant,
        estimator,
        temperature,
        mask,
        sampled_ids,
        reduction,
    )
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(vocab, student_hidden.dtype, linear_teacher)
    elif isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    require_extension(student_hidden.device)

    batch_shape = tuple(student_hidden.shape[:-1])
    hidden_rows = student_hidden.reshape(-1, student_hidden.shape[-1])
    rows = hidden_rows.shape[0]
    acc = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    valid = (
        torch.ones(rows, dtype=torch.bool, device=hidden_rows.device)
        if mask is None
        else mask.reshape(-1).bool()
    )
    flat_ids = None if sampled_ids is None else sampled_ids.reshape(-1).long()
    teacher_logits = teacher_hidden = teacher_weight = teacher_bias = None
    payload, teacher_sampled = [], None
    if linear_teacher:
        teacher_hidden = teacher.hidden.reshape(rows, teacher.hidden.shape[-1])
        teacher_weight, teacher_bias = teacher.weight, teacher.bias
    elif isinstance(teacher, TeacherPayload):
        payload = [
            getattr(teacher, name).reshape(rows, *getattr(teacher, name).shape[len(batch_shape) :])
            for name in _PAYLOAD_FIELDS
        ]
        payload = [t if t.dtype == torch.int64 else t.to(acc) for t in payload]
        if flat_ids is not None:
            teacher_sampled = teacher.sampled_log_probs.reshape(rows).to(acc)
    else:
        teacher_logits = teacher.reshape(rows, vocab)
    differentiable = (student_hidden, student_weight, student_bias)
    compute_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in differentiable
    )
    scalar = reduction != "none"
    (loss, loss_rows, metric_rows, student_lse, teacher_lse, *_) = (
        torch.ops.opd_fast.linear_opd_forward(
            hidden_rows,
            student_weight,
            student_bias,
            teacher_logits,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            payload,
            teacher_sampled,
            flat_ids,
            None if mask is None else valid,
            _row_weight(valid, reduction, batch_shape, acc) if scalar else None,
            vocab,
            k,
            variant,
            estimator,
            float(temperature),
            chunk_tokens,
            compute_grad and scalar,
        )
    )
    if check_values and not torch.compiler.is_compiling():
        # The chunked pass keeps log sum exp(z / tau) per row: it stands for max + log_norm.
        result = kernels.ForwardResult(
            loss_rows.detach(),
            metric_rows,
            student_lse,
            teacher_lse,
            grad_scale=None,
            sparse_id=None,
            sparse_coef=None,
            student_max=student_lse,
            student_log_norm=torch.zeros_like(student_lse),
        )
        _check_values(valid, flat_ids, vocab, result, teacher if payload else None)
    if not scalar:
        loss = reduce_rows(loss_rows, valid, "none", batch_shape)
    metrics = _mean_metrics(metric_rows, valid, sampled_ids is not None)
    token_metrics = None
    if return_token_metrics:
        token_metrics = {"loss": loss_rows.detach().reshape(batch_shape)}
        for index, name in enumerate(TOKEN_METRIC_NAMES):
            if name == "sampled_token_kl" and sampled_ids is None:
                continue
            token_metrics[name] = metric_rows[:, index].reshape(batch_shape)
    return OPDLossOutput(loss=loss, metrics=metrics, token_metrics=token_metrics)
