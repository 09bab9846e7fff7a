"""The public OPD loss: opd_fast.opd_loss and the nn.Module wrapper OPDLoss.

Validates arguments (errors name the problem), flattens (B, T, V) to (N, V), runs the fused
op, reduces per-token losses and metrics over valid tokens. Math: docs/math.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_fast.op import kernels
from opd_fast.op._extension import require_extension
from opd_fast.op.names import (
    LOGITS_DTYPES,
    NEEDS_TEACHER_LOGITS,
    REDUCTIONS,
    TOKEN_METRIC_NAMES,
    check_k,
    check_temperature,
    check_variant_estimator,
)
from opd_fast.op.payload import TeacherPayload
from opd_fast.op.reference import reduce_rows


class NonFiniteLogitsError(ValueError):
    """Logits hold NaN or +inf, or a whole row is -inf (checked when check_values=True)."""


@dataclass
class OPDLossOutput:
    """loss: scalar (or per token for reduction='none'), differentiable w.r.t. student_logits.
    metrics: means over valid tokens (docs/math.md, Metrics) as 0-dim fp32 tensors (no host
      sync), plus `overlap_empty_rows` (valid tokens left out of overlap_token_advantage's mean) and
      `num_tokens`. `sampled_token_kl` appears when sampled_ids is given.
    token_metrics: per-token tensors shaped like the logits' leading dims (with the per-token
      `loss`), only when return_token_metrics=True.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    token_metrics: dict[str, torch.Tensor] | None = None


def _check_payload(student_logits, payload: TeacherPayload, k, variant, sampled_ids):
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


def _check_arguments(
    student_logits,
    teacher_logits,
    k,
    variant,
    estimator,
    temperature,
    mask,
    sampled_ids,
    reduction,
):
    if isinstance(teacher_logits, TeacherPayload):
        _check_payload(student_logits, teacher_logits, k, variant, sampled_ids)
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
    for name, tensor in (("mask", mask), ("sampled_ids", sampled_ids)):
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
    if reduction == "seq_mean_token_sum" and student_logits.dim() != 3:
        raise ValueError("reduction='seq_mean_token_sum' needs (B, T, V) logits")


def _check_values(valid, sampled_ids, vocab, result: kernels.ForwardResult, payload=None):
    """Host-side checks of values (one device sync); skipped under torch.compile."""
    if sampled_ids is not None:
        out_of_range = valid & ((sampled_ids < 0) | (sampled_ids >= vocab))
        if bool(out_of_range.any()):
            row = int(out_of_range.nonzero()[0, 0])
            raise ValueError(
                f"sampled_ids out of range [0, {vocab}): row {row} holds {int(sampled_ids[row])}"
            )
    # max + log_norm is finite exactly when the row is (no overflow of max / tau at a tiny tau).
    checked = [("student_logits", result.student_max + result.student_log_norm)]
    if payload is not None:  # a payload: its NaNs reach the per-row loss and metrics
        for name, ids in (("topk_ids", payload.topk_ids), ("requested_ids", payload.requested_ids)):
            outside = (ids < 0) | (ids >= vocab)
            if bool(outside.any()):
                raise NonFiniteLogitsError(
                    f"teacher payload {name}: {int(outside.sum())} id(s) outside [0, {vocab})"
                )
        rows = valid.shape[0]
        # NaN marks what a teacher cannot tell (an OpenAI-compatible engine: its entropy, its
        # log-probs at student ids it returned none for); those only make the entropy
        # metrics NaN, or the loss of a variant that needs them (checked below). A NaN at an
        # id of the teacher's own top-k, or in its top-k / sampled log-probs, is corruption.
        requested_ids = payload.requested_ids.reshape(rows, -1)
        in_teacher_topk = (
            requested_ids.unsqueeze(-1) == payload.topk_ids.reshape(rows, 1, -1)
        ).any(-1)
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
        bad = valid & torch.isnan(result.loss.detach())
        if bool(bad.any()):
            raise NonFiniteLogitsError(
                f"teacher payload: the loss is NaN in {int(bad.sum())} valid row(s) (first: "
                f"flattened row {int(bad.nonzero()[0, 0])}): this variant needs teacher "
                "log-probs that the payload does not have (NaN requested_log_probs)"
            )
    else:
        checked.append(("teacher_logits", result.teacher_lse))
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


def _mean_metrics(metric_rows, valid, sampled_given):
    """Means over valid tokens; overlap_token_advantage skips rows with an empty overlap."""
    weights = valid.to(metric_rows.dtype)
    count = weights.sum()
    denominator = count.clamp_min(1)
    means = {}
    for index, name in enumerate(TOKEN_METRIC_NAMES):
        if name == "sampled_token_kl" and not sampled_given:
            continue
        column = metric_rows[:, index]
        if name == "overlap_token_advantage":
            defined = valid & ~torch.isnan(column)
            total = torch.where(defined, column, torch.zeros_like(column)).sum()
            defined_count = defined.to(column.dtype).sum()
            means[name] = (total / defined_count.clamp_min(1)).float()
            means["overlap_empty_rows"] = (count - defined_count).float()
        else:
            means[name] = ((column * weights).sum() / denominator).float()
    means["num_tokens"] = count.float()
    return means


def _sparse_forward(student_rows, payload, flat_ids, row_valid, k, variant, estimator, temperature):
    acc = torch.float64 if student_rows.dtype == torch.float64 else torch.float32
    rows = student_rows.shape[0]

    def per_row(tensor, dtype=acc):
        return tensor.reshape(rows, k).to(dtype)

    sampled_log_probs = None
    if flat_ids is not None:
        sampled_log_probs = payload.sampled_log_probs.reshape(rows).to(acc)
    return kernels.opd_forward_sparse(
        student_rows,
        per_row(payload.requested_ids, torch.int64),
        per_row(payload.topk_ids, torch.int64),
        per_row(payload.topk_log_probs),
        per_row(payload.requested_log_probs),
        payload.entropy.reshape(rows).to(acc),
        flat_ids,
        sampled_log_probs,
        row_valid,
        k,
        variant,
        estimator,
        temperature,
    )


def opd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TeacherPayload,
    *,
    k: int = 16,
    variant: str = "student_topk",
    estimator: str = "pg",
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    sampled_ids: torch.Tensor | None = None,
    reduction: str = "token_mean",
    return_token_metrics: bool = False,
    check_values: bool = True,
) -> OPDLossOutput:
    """Top-k reverse-KL OPD loss and its metrics, fused (one pass forward, one backward).

    student_logits, teacher_logits: (N, V) or (B, T, V), same dtype (fp32/bf16/fp16/fp64);
      gradients flow to student_logits only and come back in its dtype. teacher_logits may
      instead be a TeacherPayload (a remote teacher's answer for the student's top-k ids, see
      opd_fast.op.payload): same loss, gradient and metrics, every variant but full_vocab.
    mask: bool/0-1 tensor shaped like the leading dims; False tokens are skipped entirely.
    sampled_ids: int tensor shaped like the leading dims (the realised tokens y_t); needed
      for variant='sampled_token', and adds the sampled_token_kl metric.
    variant: student_topk | teacher_topk | overlap_topk | nonoverlap_topk | union_topk |
      full_vocab | sampled_token.  estimator: pg | exact.
    reduction: token_mean | seq_mean_token_sum (needs (B, T, V)) | sum | none.
    check_values: raise on NaN/+inf logits, all -inf rows and out-of-range sampled_ids
      (costs one device sync; skipped inside torch.compile).
    """
    _check_arguments(
        student_logits,
        teacher_logits,
        k,
        variant,
        estimator,
        temperature,
        mask,
        sampled_ids,
        reduction,
    )
    require_extension(student_logits.device)
    batch_shape = tuple(student_logits.shape[:-1])
    vocab = student_logits.shape[-1]
    student_rows = student_logits.reshape(-1, vocab)
    rows = student_rows.shape[0]
    sparse = isinstance(teacher_logits, TeacherPayload)
    valid = (
        torch.ones(rows, dtype=torch.bool, device=student_rows.device)
        if mask is None
        else mask.reshape(-1).bool()
    )
    flat_ids = None if sampled_ids is None else sampled_ids.reshape(-1).long()
    row_valid = None if mask is None else valid
    if sparse:
        result = _sparse_forward(
            student_rows,
            teacher_logits,
            flat_ids,
            row_valid,
            k,
            variant,
            estimator,
            float(temperature),
        )
    else:
        result = kernels.opd_forward(
            student_rows,
            teacher_logits.reshape(-1, vocab),
            flat_ids,
            row_valid,
            k,
            variant,
            estimator,
            float(temperature),
        )
    if check_values and not torch.compiler.is_compiling():
        _check_values(valid, flat_ids, vocab, result, teacher_logits if sparse else None)
    loss = reduce_rows(result.loss, valid, reduction, batch_shape)
    metrics = _mean_metrics(result.metrics, valid, sampled_ids is not None)
    token_metrics = None
    if return_token_metrics:
        token_metrics = {"loss": result.loss.detach().reshape(batch_shape)}
        for index, name in enumerate(TOKEN_METRIC_NAMES):
            if name == "sampled_token_kl" and sampled_ids is None:
                continue
            token_metrics[name] = result.metrics[:, index].reshape(batch_shape)
    return OPDLossOutput(loss=loss, metrics=metrics, token_metrics=token_metrics)


class OPDLoss(torch.nn.Module):
    """nn.Module form of opd_loss with the loss settings fixed at construction."""

    def __init__(
        self,
        k: int = 16,
        variant: str = "student_topk",
        estimator: str = "pg",
        temperature: float = 1.0,
        reduction: str = "token_mean",
    ):
        super().__init__()
        self.k, self.variant, self.estimator = k, variant, estimator
        self.temperature, self.reduction = temperature, reduction

    def settings(self) -> dict:
        """The opd_loss keywords this module fixes."""
        names = ("k", "variant", "estimator", "temperature", "reduction")
        return {name: getattr(self, name) for name in names}

    def forward(
        self,
        student_logits,
        teacher_logits,
        mask=None,
        sampled_ids=None,
        return_token_metrics=False,
    ) -> OPDLossOutput:
        return opd_loss(
            student_logits,
            teacher_logits,
            mask=mask,
            sampled_ids=sampled_ids,
            return_token_metrics=return_token_metrics,
            **self.settings(),
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self.settings().items())
