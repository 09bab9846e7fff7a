"""The losses' checks, written once for `opd_loss` and `linear_opd_loss`: their arguments
(types, shapes, dtypes, devices, names; before any kernel runs) and, after the forward pass,
the values (NaN or +inf logits, all -inf rows, out-of-range ids, a corrupt payload). Every
error names the problem.
"""

from __future__ import annotations

import torch

from opd_fast.op.names import (
    LOGITS_DTYPES,
    NEEDS_TEACHER_LOGITS,
    REDUCTIONS,
    check_k,
    check_temperature,
    check_variant_estimator,
)
from opd_fast.op.payload import TeacherPayload


class NonFiniteLogitsError(ValueError):
    """Logits hold NaN or +inf, or a whole row is -inf (checked when check_values=True)."""


def check_payload(student_logits, payload: TeacherPayload, k, variant, sampled_ids) -> None:
    """A TeacherPayload shaped like the logits' leading dims (by k where it has k columns)."""
    if variant in NEEDS_TEACHER_LOGITS:
        raise ValueError(f"variant={variant!r} needs the teacher's full logits, not a payload")
    lead = tuple(student_logits.shape[:-1])
    for name in ("topk_ids", "topk_log_probs", "requested_ids", "requested_log_probs"):
        tensor = getattr(payload, name)
        if tuple(tensor.shape) != lead + (k,):
            raise ValueError(
                f"teacher payload {name} must be {lead + (k,)} (the logits' leading dims by "
                f"k={k}), got {tuple(tensor.shape)}"
            )
    if tuple(payload.entropy.shape) != lead:
        raise ValueError(
            f"teacher payload entropy must be {lead}, got {tuple(payload.entropy.shape)}"
        )
    if sampled_ids is not None and payload.sampled_log_probs is None:
        raise ValueError("sampled_ids given but the teacher payload has no sampled_log_probs")
    for name in ("topk_ids", "requested_ids"):
        if getattr(payload, name).dtype != torch.int64:
            raise TypeError(f"teacher payload {name} must be int64")
    tensors = [
        getattr(payload, n)
        for n in ("topk_ids", "topk_log_probs", "requested_ids", "requested_log_probs", "entropy")
    ]
    if any(t.device != student_logits.device for t in tensors):
        raise ValueError(f"teacher payload must be on {student_logits.device} like the logits")


def check_arguments(
    student_logits,
    teacher_logits,
    *,
    k,
    variant,
    estimator,
    temperature,
    mask,
    sampled_ids,
    reduction,
    token_weights=None,
) -> None:
    """opd_loss's arguments (linear_opd_loss passes zero-memory stand-ins for the logits)."""
    if isinstance(teacher_logits, TeacherPayload):
        check_payload(student_logits, teacher_logits, k, variant, sampled_ids)
        teacher_logits = student_logits  # the remaining checks are the student's
    for name, tensor in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() not in (2, 3):
            raise ValueError(f"{name} must be (N, V) or (B, T, V), got shape {tuple(tensor.shape)}")
        if tensor.dtype not in LOGITS_DTYPES:
            raise TypeError(
                f"{name} must be float32, bfloat16, float16 or float64, got {tensor.dtype}"
            )
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"vocabulary mismatch: student_logits has V={student_logits.shape[-1]}, "
            f"teacher_logits has V={teacher_logits.shape[-1]}; slice both to the shared "
            "vocabulary first"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"shape mismatch: student_logits {tuple(student_logits.shape)} vs teacher_logits "
            f"{tuple(teacher_logits.shape)}"
        )
    if student_logits.dtype != teacher_logits.dtype:
        raise TypeError(
            f"dtype mismatch: student_logits is {student_logits.dtype}, teacher_logits is "
            f"{teacher_logits.dtype}; cast the teacher logits to the student's dtype"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"device mismatch: student_logits on {student_logits.device}, teacher_logits on "
            f"{teacher_logits.device}"
        )
    if student_logits.device.type not in ("cpu", "cuda"):
        raise ValueError(f"opd_fast runs on cpu and cuda, got {student_logits.device}")
    check_variant_estimator(variant, estimator)
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    if variant == "sampled_token" and sampled_ids is None:
        raise ValueError("variant='sampled_token' needs sampled_ids (the realised tokens)")
    check_k(k, student_logits.shape[-1])
    check_temperature(temperature, student_logits.dtype)
    batch_shape = tuple(student_logits.shape[:-1])
    for name, tensor in (
        ("mask", mask),
        ("sampled_ids", sampled_ids),
        ("token_weights", token_weights),
    ):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != batch_shape:
            raise ValueError(
                f"{name} must have the logits' leading shape {batch_shape}, got "
                f"{tuple(tensor.shape)}"
            )
        if tensor.device != student_logits.device:
            raise ValueError(f"{name} on {tensor.device} but logits on {student_logits.device}")
    if sampled_ids is not None and (
        sampled_ids.dtype.is_floating_point or sampled_ids.dtype == torch.bool
    ):
        raise TypeError(f"sampled_ids must be an integer tensor, got {sampled_ids.dtype}")
    if token_weights is not None and not token_weights.dtype.is_floating_point:
        raise TypeError(f"token_weights must be a floating tensor, got {token_weights.dtype}")
    if reduction == "seq_mean_token_sum" and student_logits.dim() != 3:
        raise ValueError("reduction='seq_mean_token_sum' needs (B, T, V) logits")


def check_linear(name: str, hidden, weight, bias, vocab) -> None:
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


def check_vocab(vocab, weight_rows: int) -> int:
    """linear_opd_loss's vocab (None: every row of the weight)."""
    if vocab is None:
        return weight_rows
    if isinstance(vocab, bool) or not isinstance(vocab, int):
        raise TypeError(f"vocab must be an int, got {type(vocab).__name__}")
    if vocab < 1:
        raise ValueError(f"vocab must be at least 1, got {vocab}")
    return vocab


def check_values(
    valid: torch.Tensor,
    sampled_ids: torch.Tensor | None,
    vocab: int,
    *,
    student_lse: torch.Tensor,
    teacher_lse: torch.Tensor | None,
    loss_rows: torch.Tensor,
    payload: TeacherPayload | None = None,
) -> None:
    """Host-side checks of values after the forward pass (one device sync); the callers skip
    them under torch.compile.

    student_lse (N,): finite exactly where the student's row is (max + log_norm: no overflow
    of max / tau at a tiny tau). teacher_lse (N,): the same for teacher logits (None for a
    payload). loss_rows (N,): a payload's NaNs reach the loss of a variant that needs them.
    """
    if sampled_ids is not None:
        out_of_range = valid & ((sampled_ids < 0) | (sampled_ids >= vocab))
        if bool(out_of_range.any()):
            row = int(out_of_range.nonzero()[0, 0])
            raise ValueError(
                f"sampled_ids out of range [0, {vocab}): row {row} holds {int(sampled_ids[row])}"
            )
    checked = [("student_logits", student_lse)]
    if payload is not None:
        _check_payload_values(valid, vocab, payload, loss_rows)
    else:
        checked.append(("teacher_logits", teacher_lse))
    for name, lse in checked:
        bad = valid & ~torch.isfinite(lse)
        if bool(bad.any()):
            rows = bad.nonzero()[:, 0]
            first = int(rows[0])
            problem = "every entry is -inf" if float(lse[first]) == float("-inf") else "NaN or +inf"
            raise NonFiniteLogitsError(
                f"{name}: {rows.numel()} valid row(s) with {problem} (first: flattened row "
                f"{first}); -inf is allowed for masked vocabulary entries, NaN and +inf are not"
            )


def _check_payload_values(valid, vocab, payload: TeacherPayload, loss_rows) -> None:
    for name, ids in (("topk_ids", payload.topk_ids), ("requested_ids", payload.requested_ids)):
        outside = (ids < 0) | (ids >= vocab)
        if bool(outside.any()):
            raise NonFiniteLogitsError(
                f"teacher payload {name}: {int(outside.sum())} id(s) outside [0, {vocab})"
            )
    rows = valid.shape[0]
    # NaN marks what a teacher cannot tell (an OpenAI-compatible engine: its entropy, its
    # log-probs at student ids it returned none for); those only make the entropy metrics
    # NaN, or the loss of a variant that needs them (checked below). A NaN at an id of the
    # teacher's own top-k, or in its top-k / sampled log-probs, is corruption.
    requested_ids = payload.requested_ids.reshape(rows, -1)
    in_teacher_topk = (requested_ids.unsqueeze(-1) == payload.topk_ids.reshape(rows, 1, -1)).any(-1)
    floats = [
        payload.topk_log_probs.reshape(rows, -1),
        payload.requested_log_probs.reshape(rows, -1).masked_fill(~in_teacher_topk, 0),
    ]
    if payload.sampled_log_probs is not None:
        floats.append(payload.sampled_log_probs.reshape(rows, 1))
    bad = valid & torch.cat([torch.isnan(t).any(dim=1, keepdim=True) for t in floats], 1).any(1)
    if bool(bad.any()):
        raise NonFiniteLogitsError(
            f"teacher payload: NaN in {int(bad.sum())} valid row(s) (first: flattened row "
            f"{int(bad.nonzero()[0, 0])})"
        )
    bad = valid & torch.isnan(loss_rows.detach())
    if bool(bad.any()):
        raise NonFiniteLogitsError(
            f"teacher payload: the loss is NaN in {int(bad.sum())} valid row(s) (first: "
            f"flattened row {int(bad.nonzero()[0, 0])}): this variant needs teacher "
            "log-probs that the payload does not have (NaN requested_log_probs)"
        )
