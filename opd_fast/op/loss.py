"""The public OPD loss: opd_fast.opd_loss and the nn.Module wrapper OPDLoss.

Checks the arguments (errors name the problem, `checks`), flattens (B, T, V) to (N, V), runs
the fused op (`kernels`), reduces per-token losses and metrics over valid tokens
(`reductions`). Math: docs/math.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_fast.op import checks, kernels
from opd_fast.op._extension import require_extension
from opd_fast.op.checks import NonFiniteLogitsError
from opd_fast.op.payload import TeacherPayload
from opd_fast.op.reductions import mean_metrics, per_token_metrics, reduce_rows, valid_rows

__all__ = ["NonFiniteLogitsError", "OPDLoss", "OPDLossOutput", "opd_loss"]


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
    token_weights: torch.Tensor | None = None,
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
      full_vocab | sampled_token.  estimator: pg | exact | tail.
    reduction: token_mean | seq_mean_token_sum (needs (B, T, V)) | sum | none.
    token_weights: float tensor shaped like the leading dims, multiplying each token's loss
      before the reduction (e.g. truncated importance-sampling weights); no gradient flows into
      them, and token_mean still divides by the count of valid tokens.
    check_values: raise on NaN/+inf logits, all -inf rows and out-of-range sampled_ids
      (costs one device sync; skipped inside torch.compile).
    """
    checks.check_arguments(
        student_logits,
        teacher_logits,
        k=k,
        variant=variant,
        estimator=estimator,
        temperature=temperature,
        mask=mask,
        sampled_ids=sampled_ids,
        reduction=reduction,
        token_weights=token_weights,
    )
    require_extension(student_logits.device)
    batch_shape = tuple(student_logits.shape[:-1])
    vocab = student_logits.shape[-1]
    student_rows = student_logits.reshape(-1, vocab)
    rows = student_rows.shape[0]
    sparse = isinstance(teacher_logits, TeacherPayload)
    valid = valid_rows(mask, rows, student_rows.device)
    flat_ids = None if sampled_ids is None else sampled_ids.reshape(-1).long()
    row_valid = None if mask is None else valid
    settings = (k, variant, estimator, float(temperature))
    if sparse:
        result = _sparse_forward(student_rows, teacher_logits, flat_ids, row_valid, *settings)
    else:
        result = kernels.opd_forward(
            student_rows, teacher_logits.reshape(-1, vocab), flat_ids, row_valid, *settings
        )
    if check_values and not torch.compiler.is_compiling():
        check_values_of(valid, flat_ids, vocab, result, teacher_logits if sparse else None)
    loss = reduce_rows(result.loss, valid, reduction, batch_shape, token_weights)
    sampled_given = sampled_ids is not None
    return OPDLossOutput(
        loss=loss,
        metrics=mean_metrics(result.metrics, valid, sampled_given),
        token_metrics=per_token_metrics(result.loss, result.metrics, batch_shape, sampled_given)
        if return_token_metrics
        else None,
    )


def check_values_of(valid, flat_ids, vocab, result: kernels.ForwardResult, payload) -> None:
    """checks.check_values on a forward's per-row results."""
    checks.check_values(
        valid,
        flat_ids,
        vocab,
        student_lse=result.student_max + result.student_log_norm,
        teacher_lse=result.teacher_lse,
        loss_rows=result.loss,
        payload=payload,
    )


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
