"""The teacher's payload (docs/math.md, Teacher payload): what a remote teacher returns per
response position instead of (T, V) logits, and how it is computed from logits.

With it the loss, its gradient and every metric are exact for every variant but full_vocab:
the student's top-k ids are sent to the teacher, which answers with its own top-k ids and
log-probs, its log-probs at the student's ids, at the realised token, and its entropy.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from opd_fast.op import kernels


@dataclass
class TeacherPayload:
    """Leading dims (N,) or (B, T) like the logits; k columns where noted.

    topk_ids, topk_log_probs: the teacher's top-k (ties -> lower id), (..., k)
    requested_ids: the student's top-k ids the teacher was asked about, (..., k)
    requested_log_probs: teacher log-probs at requested_ids, (..., k)
    entropy: teacher entropy H(q_t), (...)
    sampled_log_probs: teacher log-prob of the realised token, (...), or None

    A teacher that cannot compute everything (opd_fast.teachers.openai) puts NaN in
    entropy and in requested_log_probs at the ids it returned no log-prob for (outside the
    engine's top-N and the realised token): the entropy metrics are then NaN, and opd_loss
    refuses a variant whose loss needs the missing log-probs.
    """

    topk_ids: torch.Tensor
    topk_log_probs: torch.Tensor
    requested_ids: torch.Tensor
    requested_log_probs: torch.Tensor
    entropy: torch.Tensor
    sampled_log_probs: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return self.topk_ids.shape[-1]

    def map(self, fn) -> TeacherPayload:
        """Apply fn to every tensor (reshape, .to(device), slicing rows ...)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return TeacherPayload(**{n: None if v is None else fn(v) for n, v in values.items()})

    def nbytes_per_position(self) -> float:
        rows = self.entropy.numel()
        total = sum(
            getattr(self, f.name).nbytes for f in fields(self) if getattr(self, f.name) is not None
        )
        return total / max(rows, 1)


@torch.no_grad()
def payload_from_logits(
    teacher_logits: torch.Tensor,
    requested_ids: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    sampled_ids: torch.Tensor | None = None,
) -> TeacherPayload:
    """What a teacher server computes: teacher_logits (N, V), requested_ids (N, k) int64,
    sampled_ids (N,) -> TeacherPayload with float32 (float64 for float64 logits) log-probs."""
    top = kernels.row_topk(teacher_logits, k, temperature)
    rows = torch.arange(teacher_logits.shape[0], device=teacher_logits.device)
    # log q(x) = (x - max) / tau + log q(argmax): shifted by the row max before scaling, like
    # the kernels, so that a tiny tau or huge logits keep log q exact (x / tau - lse would not).
    row_max = teacher_logits[rows, top.ids[:, 0]].to(top.lse.dtype)
    log_q_max = top.log_probs[:, 0]

    def log_probs_at(ids):
        two_d = ids.dim() == 2
        picked = teacher_logits[rows.unsqueeze(-1) if two_d else rows, ids].to(top.lse.dtype)
        shift = row_max.unsqueeze(-1) if two_d else row_max
        offset = log_q_max.unsqueeze(-1) if two_d else log_q_max
        return (picked - shift) / temperature + offset

    return TeacherPayload(
        topk_ids=top.ids,
        topk_log_probs=top.log_probs,
        requested_ids=requested_ids,
        requested_log_probs=log_probs_at(requested_ids),
        entropy=top.entropy,
        sampled_log_probs=None if sampled_ids is None else log_probs_at(sampled_ids),
    )
