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
reduction and by any token weights (Liger's fused linear losses do the same), and the backward
only scales them by grad_output: no GEMM is repeated. reduction='none' cannot know the
per-token upstream gradient in advance: its backward runs the chunked pass again with it.

The op is `torch.ops.opd_fast.linear_opd_forward`, a torch.library custom op with a fake
kernel and autograd, so torch.compile treats it as one opaque node. Its schema is flat (a
custom op takes tensors and scalars); `LinearOpInputs` / `LinearOpOutputs` name its fields,
and the teacher's form (logits, a LinearTeacher, a payload) is resolved into exactly one group
of them before the op is called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from opd_fast.op import checks, kernels
from opd_fast.op._extension import require_extension
from opd_fast.op.loss import OPDLossOutput
from opd_fast.op.names import NEEDS_TEACHER_LOGITS, TOKEN_METRIC_NAMES
from opd_fast.op.payload import TeacherPayload
from opd_fast.op.reductions import (
    mean_metrics,
    per_token_metrics,
    reduce_rows,
    row_weights,
    valid_rows,
)

# The working memory a chunk may use: its student logits, their gradient and (for a
# LinearTeacher) the teacher's logits, each (chunk, vocab) in the hidden states' dtype.
# 256 MiB is 220 tokens at V = 151,936 in fp32 with teacher logits given (147 with a
# LinearTeacher): enough rows for the GEMMs to run at full speed, and a small fraction of
# the (N, V) tensors it replaces.
CHUNK_MEMORY_BYTES = 256 * 2**20

# A payload's arrays in the order the op's `payload` list holds them (SparseForwardInputs').
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


def _logits(hidden, weight, bias, vocab):
    """(c, H) @ (vocab, H).T (+ bias) -> (c, vocab) in the hidden states' dtype."""
    if bias is None:
        return torch.mm(hidden, weight[:vocab].t())
    return torch.addmm(bias[:vocab], hidden, weight[:vocab].t())


def for_logit_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    vocab: int,
    chunk_tokens: int,
    fn: Callable[[int, int, torch.Tensor], None],
) -> None:
    """fn(start, end, logits) for the logits (end - start, vocab) of hidden (N, H) @
    weight[:vocab].T (+ bias), a chunk of rows at a time, without a gradient; each chunk's
    logits are freed before the next one is formed."""
    with torch.no_grad():
        for start in range(0, hidden.shape[0], chunk_tokens):
            end = min(start + chunk_tokens, hidden.shape[0])
            fn(start, end, _logits(hidden[start:end], weight, bias, vocab))


def linear_topk_ids(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    vocab: int,
    k: int,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """The top-k ids (ties -> lower id) of each row of the logits hidden @ weight[:vocab].T
    (+ bias), formed a chunk of tokens at a time: what a payload teacher is asked about.

    hidden: (..., H). Returns (..., k) int64."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(vocab, hidden.dtype, linear_teacher=False)
    ids = torch.empty((rows.shape[0], k), dtype=torch.int64, device=hidden.device)

    def top(start, end, logits):
        ids[start:end] = kernels.row_topk(logits, k).ids

    for_logit_chunks(rows, weight, bias, vocab, chunk_tokens, top)
    return ids.reshape(*hidden.shape[:-1], k)


# ---------------------------------------------------------------------------------------------
# The chunked pass (the custom op's body)
# ---------------------------------------------------------------------------------------------


class LinearOpInputs(NamedTuple):
    """The inputs of torch.ops.opd_fast.linear_opd_forward, by name (its schema's order).

    student_hidden: (N, H); student_weight: (V_rows, H); student_bias: (V_rows,) or None.
    The teacher is one of three groups, the others None / empty: teacher_logits (N, vocab);
    teacher_hidden (N, H_t) with teacher_weight (V_t_rows, H_t) and teacher_bias; payload,
    the five arrays of a TeacherPayload in _PAYLOAD_FIELDS order (accumulation dtype, ids
    int64) with teacher_sampled_log_probs (N,).
    sampled_ids (N,) int64; row_valid (N,) bool; row_weight (N,) accumulation dtype: d loss /
    d loss_rows (zero where not valid), None for reduction='none'.
    fp32_weight_grad: sum a low-precision weight gradient over the chunks in fp32 and round
    it once (else it is summed in place, in the weight's dtype).
    """

    student_hidden: torch.Tensor
    student_weight: torch.Tensor
    student_bias: torch.Tensor | None
    teacher_logits: torch.Tensor | None
    teacher_hidden: torch.Tensor | None
    teacher_weight: torch.Tensor | None
    teacher_bias: torch.Tensor | None
    payload: list[torch.Tensor]
    teacher_sampled_log_probs: torch.Tensor | None
    sampled_ids: torch.Tensor | None
    row_valid: torch.Tensor | None
    row_weight: torch.Tensor | None
    vocab: int
    k: int
    variant: str
    estimator: str
    temperature: float
    chunk_tokens: int
    compute_grad: bool
    fp32_weight_grad: bool


class LinearOpOutputs(NamedTuple):
    """The outputs of torch.ops.opd_fast.linear_opd_forward.

    loss = sum(row_weight * loss_rows) (0 when row_weight is None); loss_rows (N,); metrics
    (N, M); student_lse, teacher_lse (N,); when compute_grad the gradients of loss w.r.t.
    student_hidden (N, H), student_weight (V_rows, H) and student_bias (V_rows,), in the dtype
    of each input (shape (0,) otherwise).
    """

    loss: torch.Tensor
    loss_rows: torch.Tensor
    metrics: torch.Tensor
    student_lse: torch.Tensor
    teacher_lse: torch.Tensor
    grad_hidden: torch.Tensor
    grad_weight: torch.Tensor
    grad_bias: torch.Tensor


def _chunk_forward(args: LinearOpInputs, student, start: int, end: int):
    """The fused forward of rows [start, end) given their student logits: (ForwardResult,
    the teacher logits the backward reads, or None for a payload)."""
    ids = None if args.sampled_ids is None else args.sampled_ids[start:end]
    valid = None if args.row_valid is None else args.row_valid[start:end]
    settings = (args.k, args.variant, args.estimator, args.temperature)
    if args.payload:
        sampled = args.teacher_sampled_log_probs
        result = kernels.opd_forward_sparse(
            student,
            *(tensor[start:end] for tensor in args.payload),
            ids,
            None if sampled is None else sampled[start:end],
            valid,
            *settings,
        )
        return result, None
    if args.teacher_logits is not None:
        teacher = args.teacher_logits[start:end]
    else:
        teacher = _logits(
            args.teacher_hidden[start:end], args.teacher_weight, args.teacher_bias, args.vocab
        )
    return kernels.opd_forward(student, teacher, ids, valid, *settings), teacher


def _chunked_pass(args: LinearOpInputs) -> LinearOpOutputs:
    """One chunked pass over the N tokens (see LinearOpInputs / LinearOpOutputs)."""
    hidden_rows, student_weight, vocab = args.student_hidden, args.student_weight, args.vocab
    rows, dtype, device = hidden_rows.shape[0], hidden_rows.dtype, hidden_rows.device
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    loss_rows = torch.empty(rows, dtype=acc, device=device)
    metrics = torch.empty(rows, len(TOKEN_METRIC_NAMES), dtype=acc, device=device)
    student_lse = torch.empty(rows, dtype=acc, device=device)
    teacher_lse = torch.empty(rows, dtype=acc, device=device)
    compute_grad = args.compute_grad and args.row_weight is not None
    weight_rows = student_weight[:vocab]
    chunk_tokens = args.chunk_tokens
    if compute_grad:
        grad_hidden = torch.empty_like(hidden_rows)
        # The weight gradient is summed over the chunks in place, in the weight's dtype: no
        # copy of it besides the one returned. Asked for, a low-precision one is summed in
        # fp32 instead and rounded once at the end, as the materialised path's single GEMM
        # is (V_rows x H x 4 bytes more while it exists).
        sum_dtype = acc if args.fp32_weight_grad and rows > chunk_tokens else dtype
        grad_weight = torch.empty(student_weight.shape, dtype=sum_dtype, device=device)
        # Padded rows (no logit) get no gradient; with no tokens, no row does.
        grad_weight[vocab if rows else 0 :].zero_()
        grad_bias = torch.zeros(student_weight.shape[0], dtype=acc, device=device)
    for start in range(0, rows, chunk_tokens):
        end = min(start + chunk_tokens, rows)
        hidden = hidden_rows[start:end]
        student = _logits(hidden, student_weight, args.student_bias, vocab)
        result, teacher = _chunk_forward(args, student, start, end)
        loss_rows[start:end] = result.loss
        metrics[start:end] = result.metrics
        student_lse[start:end] = result.student_lse
        teacher_lse[start:end] = result.teacher_lse
        if not compute_grad:
            continue
        grad_logits = torch.ops.opd_fast.opd_backward(
            args.row_weight[start:end].contiguous(),
            student,
            student if teacher is None else teacher,  # read only for full_vocab
            result.student_max,
            result.student_log_norm,
            result.grad_scale,
            result.sparse_id,
            result.sparse_coef,
            args.temperature,
            args.variant in NEEDS_TEACHER_LOGITS,
            kernels.sparse_is_gradient(args.estimator),
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
        if args.student_bias is not None:
            grad_bias[:vocab] += grad_logits.sum(0, dtype=acc)
        del grad_logits
    valid_rows = (
        torch.ones(rows, dtype=torch.bool, device=device)
        if args.row_valid is None
        else args.row_valid
    )
    masked = torch.where(valid_rows, loss_rows, torch.zeros_like(loss_rows))
    row_weight = args.row_weight
    loss = masked.new_zeros(()) if row_weight is None else (masked * row_weight.to(acc)).sum()
    if not compute_grad:
        empty = hidden_rows.new_empty((0,))
        return LinearOpOutputs(
            loss, loss_rows, metrics, student_lse, teacher_lse, empty, empty.clone(), empty.clone()
        )
    bias_dtype = dtype if args.student_bias is None else args.student_bias.dtype
    return LinearOpOutputs(
        loss,
        loss_rows,
        metrics,
        student_lse,
        teacher_lse,
        grad_hidden,
        grad_weight.to(student_weight.dtype),
        grad_bias.to(bias_dtype),
    )


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
    fp32_weight_grad: bool,
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
    """One chunked pass over N tokens: the fields of LinearOpInputs in, LinearOpOutputs out."""
    return tuple(_chunked_pass(LinearOpInputs(**locals())))


@linear_opd_forward.register_fake
def _linear_opd_forward_fake(*inputs):
    args = LinearOpInputs(*inputs)
    hidden, weight, bias = args.student_hidden, args.student_weight, args.student_bias
    rows, dtype = hidden.shape[0], hidden.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    new = hidden.new_empty
    per_row = (
        new((), dtype=acc),
        new((rows,), dtype=acc),
        new((rows, len(TOKEN_METRIC_NAMES)), dtype=acc),
        new((rows,), dtype=acc),
        new((rows,), dtype=acc),
    )
    if not (args.compute_grad and args.row_weight is not None):
        return per_row + (new((0,)), new((0,)), new((0,)))
    bias_dtype = dtype if bias is None else bias.dtype
    return per_row + (
        torch.empty_like(hidden),
        torch.empty_like(weight),
        new((weight.shape[0],), dtype=bias_dtype),
    )


# The tensor inputs a second pass (reduction='none') reads again.
_RERUN_TENSORS = (
    "student_hidden",
    "student_weight",
    "student_bias",
    "teacher_logits",
    "teacher_hidden",
    "teacher_weight",
    "teacher_bias",
    "teacher_sampled_log_probs",
    "sampled_ids",
    "row_valid",
)
_GRADIENTS = ("grad_hidden", "grad_weight", "grad_bias")


def _setup_context(ctx, inputs, output):
    args, outputs = LinearOpInputs(*inputs), LinearOpOutputs(*output)
    # The settings (no tensors) for a second pass; the tensors go through save_for_backward.
    ctx.settings = args._replace(**{name: None for name in _RERUN_TENSORS}, payload=[])
    ctx.eager = args.compute_grad and args.row_weight is not None
    ctx.has_bias = args.student_bias is not None
    saved = {name: getattr(args, name) for name in _RERUN_TENSORS}
    saved.update({name: getattr(outputs, name) for name in _GRADIENTS})
    saved.update({f"payload_{i}": tensor for i, tensor in enumerate(args.payload)})
    ctx.saved_names = tuple(saved)
    ctx.save_for_backward(*saved.values())
    # Unused outputs (the per-token loss of a scalar reduction) get no gradient, so the
    # backward can tell which pass it needs.
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(
        outputs.metrics, outputs.student_lse, outputs.teacher_lse, *outputs[5:]
    )


def _backward(ctx, grad_loss, grad_loss_rows, *unused_grads):
    saved = dict(zip(ctx.saved_names, ctx.saved_tensors))
    gradients = {"student_hidden": None, "student_weight": None, "student_bias": None}
    if grad_loss is not None and ctx.eager:
        gradients = {
            "student_hidden": grad_loss * saved["grad_hidden"],
            "student_weight": grad_loss * saved["grad_weight"],
            "student_bias": grad_loss * saved["grad_bias"],
        }
    if grad_loss_rows is not None:
        # reduction='none': the upstream gradient per token is known only now.
        payload = [saved[name] for name in ctx.saved_names if name.startswith("payload_")]
        hidden = saved["student_hidden"]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        args = ctx.settings._replace(
            **{name: saved[name] for name in _RERUN_TENSORS},
            payload=payload,
            row_weight=grad_loss_rows.to(acc),
            compute_grad=True,
        )
        again = LinearOpOutputs(*torch.ops.opd_fast.linear_opd_forward(*args))
        for name, output in zip(gradients, _GRADIENTS):
            extra = getattr(again, output)
            gradients[name] = extra if gradients[name] is None else gradients[name] + extra
    if not ctx.has_bias:
        gradients["student_bias"] = None
    grads = kernels.input_gradients(LinearOpInputs, **gradients)
    # The payload input is a list: its gradient is a list of None, one per tensor.
    payload_count = sum(name.startswith("payload_") for name in ctx.saved_names)
    return tuple(
        [None] * payload_count if name == "payload" else grad
        for name, grad in zip(LinearOpInputs._fields, grads)
    )


linear_opd_forward.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# The public function: argument checks, the teacher's form, flattening, reductions, metrics
# ---------------------------------------------------------------------------------------------


def _stand_in_logits(hidden: torch.Tensor, vocab: int) -> torch.Tensor:
    """A zero-memory tensor shaped, typed and placed like the logits hidden @ W[:vocab].T, so
    that opd_loss's own argument checks (and their messages) apply unchanged."""
    return hidden.new_empty(()).expand(*hidden.shape[:-1], vocab)


def _checked_teacher(teacher, student_hidden, vocab):
    """The teacher as opd_loss's checks see it (a LinearTeacher: stand-in logits)."""
    if isinstance(teacher, LinearTeacher):
        checks.check_linear("teacher", teacher.hidden, teacher.weight, teacher.bias, vocab)
        if teacher.hidden.shape[:-1] != student_hidden.shape[:-1]:
            raise ValueError(
                f"shape mismatch: student_hidden {tuple(student_hidden.shape)} vs teacher "
                f"hidden {tuple(teacher.hidden.shape)}: they must share the leading dims"
            )
        return _stand_in_logits(teacher.hidden, vocab)
    if isinstance(teacher, (torch.Tensor, TeacherPayload)):
        return teacher
    raise TypeError(
        "teacher must be teacher logits (a torch.Tensor), a TeacherPayload or a "
        f"LinearTeacher, got {type(teacher).__name__}"
    )


# LinearOpInputs' teacher groups, all empty: _teacher_inputs fills one.
_NO_TEACHER = {
    "teacher_logits": None,
    "teacher_hidden": None,
    "teacher_weight": None,
    "teacher_bias": None,
    "payload": [],
    "teacher_sampled_log_probs": None,
}


def _teacher_inputs(teacher, rows: int, vocab: int, acc, with_sampled: bool) -> dict:
    """The one group of LinearOpInputs that carries the teacher's form, rows flattened."""
    if isinstance(teacher, LinearTeacher):
        return {
            "teacher_hidden": teacher.hidden.reshape(rows, teacher.hidden.shape[-1]),
            "teacher_weight": teacher.weight,
            "teacher_bias": teacher.bias,
        }
    if isinstance(teacher, TeacherPayload):
        lead = teacher.entropy.dim()
        arrays = [getattr(teacher, name) for name in _PAYLOAD_FIELDS]
        arrays = [tensor.reshape(rows, *tensor.shape[lead:]) for tensor in arrays]
        return {
            "payload": [t if t.dtype == torch.int64 else t.to(acc) for t in arrays],
            "teacher_sampled_log_probs": teacher.sampled_log_probs.reshape(rows).to(acc)
            if with_sampled
            else None,
        }
    return {"teacher_logits": teacher.reshape(rows, vocab)}


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
    token_weights: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    fp32_weight_grad: bool = False,
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
    token_weights: as opd_loss's; they are folded into the gradient the forward computes.
    chunk_tokens: tokens per chunk; default default_chunk_tokens(vocab, ...), which keeps the
      chunk's (chunk, vocab) tensors within CHUNK_MEMORY_BYTES.
    fp32_weight_grad: a bf16/fp16 weight's gradient is summed over the chunks in place in its
      own dtype (one rounding per chunk; no copy of it besides the result); True sums it in
      fp32 and rounds once, like the materialised path's single GEMM, for V_rows x H x 4
      bytes more memory while the pass runs. No effect on fp32/fp64 weights.
    Every other argument, and the output, as opd_fast.opd_loss. reduction='none' runs the
    chunked pass a second time in the backward (the other reductions compute the gradient in
    the forward).
    """
    checks.check_linear("student", student_hidden, student_weight, student_bias, 0)
    vocab = checks.check_vocab(vocab, student_weight.shape[0])
    checks.check_linear("student", student_hidden, student_weight, student_bias, vocab)
    checks.check_arguments(
        _stand_in_logits(student_hidden, vocab),
        _checked_teacher(teacher, student_hidden, vocab),
        k=k,
        variant=variant,
        estimator=estimator,
        temperature=temperature,
        mask=mask,
        sampled_ids=sampled_ids,
        reduction=reduction,
        token_weights=token_weights,
    )
    if chunk_tokens is None:
        linear_teacher = isinstance(teacher, LinearTeacher)
        chunk_tokens = default_chunk_tokens(vocab, student_hidden.dtype, linear_teacher)
    elif isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    require_extension(student_hidden.device)

    batch_shape = tuple(student_hidden.shape[:-1])
    hidden_rows = student_hidden.reshape(-1, student_hidden.shape[-1])
    rows = hidden_rows.shape[0]
    acc = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    valid = valid_rows(mask, rows, hidden_rows.device)
    flat_ids = None if sampled_ids is None else sampled_ids.reshape(-1).long()
    compute_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (student_hidden, student_weight, student_bias)
    )
    scalar = reduction != "none"
    inputs = LinearOpInputs(
        student_hidden=hidden_rows,
        student_weight=student_weight,
        student_bias=student_bias,
        **_NO_TEACHER,
        sampled_ids=flat_ids,
        row_valid=None if mask is None else valid,
        row_weight=row_weights(valid, reduction, batch_shape, acc, token_weights)
        if scalar
        else None,
        vocab=vocab,
        k=k,
        variant=variant,
        estimator=estimator,
        temperature=float(temperature),
        chunk_tokens=chunk_tokens,
        compute_grad=compute_grad and scalar,
        fp32_weight_grad=bool(fp32_weight_grad),
    )._replace(**_teacher_inputs(teacher, rows, vocab, acc, flat_ids is not None))
    outputs = LinearOpOutputs(*torch.ops.opd_fast.linear_opd_forward(*inputs))
    if check_values and not torch.compiler.is_compiling():
        # The chunked pass keeps log sum exp(z / tau) per row: finite exactly where z is.
        checks.check_values(
            valid,
            flat_ids,
            vocab,
            student_lse=outputs.student_lse,
            teacher_lse=outputs.teacher_lse,
            loss_rows=outputs.loss_rows,
            payload=teacher if inputs.payload else None,
        )
    loss = outputs.loss
    if not scalar:
        loss = reduce_rows(outputs.loss_rows, valid, "none", batch_shape, token_weights)
    sampled_given = sampled_ids is not None
    return OPDLossOutput(
        loss=loss,
        metrics=mean_metrics(outputs.metrics, valid, sampled_given),
        token_metrics=per_token_metrics(
            outputs.loss_rows, outputs.metrics, batch_shape, sampled_given
        )
        if return_token_metrics
        else None,
    )
