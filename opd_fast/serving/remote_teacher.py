"""RemoteTeacher: the trainer's PayloadTeacher over `opd-fast serve-teacher`.

The trainer builds it when the config names `teacher_url` (and `teacher_token`). Per batch it
sends only the response positions of each sequence (with the student's top-k ids there),
split into requests within the server's limits, and scatters the answers back into
(B, L-1, ...) tensors. Every variant but full_vocab and every metric come out exactly as with
the teacher in process (OPD_SPEC.md section 6).
"""

from __future__ import annotations

import numpy as np
import torch

from opd_fast.payload import TeacherPayload
from opd_fast.serving import protocol
from opd_fast.serving.client import RetryPolicy, TeacherClient
from opd_fast.serving.spans import scored_spans


class RemoteTeacher:
    """PayloadTeacher (opd_fast.teacher) backed by a teacher server.

    url: http(s)://host:port of `opd-fast serve-teacher`; token: its bearer token.
    timeout: seconds per HTTP attempt; retry: backoff policy (default: retry transient
    failures for up to 120 s, so a server restart is bridged without losing a step).
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 300.0,
        retry: RetryPolicy | None = None,
    ):
        self.client = TeacherClient(url, token=token, timeout=timeout, retry=retry)
        self.url = self.client.url
        self.info = self.client.model_info()
        if self.info.get("protocol_version") != protocol.VERSION:
            raise ValueError(
                f"teacher server {self.url} speaks wire format "
                f"{self.info.get('protocol_version')!r}; this client speaks {protocol.VERSION}"
            )
        self.vocab_size = int(self.info["vocab_size"])
        self.max_k = int(self.info["max_k"])
        self.limits = self.info["limits"]

    def check_tokenizer(self, tokenizer) -> None:
        """Raise ValueError unless the server's tokenizer is the student's (same fingerprint)."""
        from opd_fast.models import tokenizer_fingerprint

        ours = tokenizer_fingerprint(tokenizer)
        theirs = self.info["tokenizer_fingerprint"]
        if ours != theirs:
            raise ValueError(
                f"the teacher server {self.url} ({self.info.get('model')}) uses a different "
                f"tokenizer than the student: fingerprint {theirs} with "
                f"{self.info.get('tokenizer_size')} tokens vs {ours} with {len(tokenizer)}. OPD "
                "compares distributions over one vocabulary, so both must use one tokenizer."
            )

    def close(self) -> None:
        self.client.close()

    # ---- scoring -----------------------------------------------------------------------

    def _requests(self, spans, k: int):
        """Group sequence spans into requests within the server's limits."""
        max_sequences = int(self.limits["max_batch_sequences"])
        max_tokens = int(self.limits["max_batch_tokens"])
        max_bytes = int(self.limits["max_request_bytes"]) - 65_536  # room for the header
        group, longest, size = [], 0, 0
        for span in spans:
            length = span.end - span.begin
            positions = span.end - 1 - span.first
            if length > int(self.limits["max_seq_len"]):
                raise ValueError(
                    f"a sequence of {length} tokens exceeds the teacher server's max_seq_len "
                    f"{self.limits['max_seq_len']}"
                )
            grown = max(longest, length)
            span_bytes = 4 * length + 4 * k * positions
            if group and (
                len(group) + 1 > max_sequences
                or (len(group) + 1) * grown > max_tokens
                or size + span_bytes > max_bytes
            ):
                yield group
                group, grown, size = [], length, 0
            group.append(span)
            longest, size = grown, size + span_bytes
        if group:
            yield group

    def payload(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor,
        requested_ids: torch.Tensor,
        k: int,
        temperature: float,
        vocab_limit: int,
    ) -> TeacherPayload:
        """(B, L) sequences -> TeacherPayload (B, L-1, ...) at the positions where
        response_mask (B, L-1) is True; elsewhere finite filler (see opd_fast.teacher)."""
        if not 1 <= k <= min(self.max_k, vocab_limit):
            raise ValueError(f"k must be in [1, min({self.max_k}, {vocab_limit})], got {k}")
        if vocab_limit > self.vocab_size:
            raise ValueError(
                f"vocab_limit {vocab_limit} exceeds the teacher's {self.vocab_size} output rows"
            )
        device = input_ids.device
        ids = input_ids.detach().cpu().numpy()
        attention = attention_mask.detach().cpu().numpy().astype(bool)
        mask = response_mask.detach().cpu().numpy().astype(bool)
        requested = requested_ids.detach().cpu()
        batch, length = ids.shape
        if mask.shape != (batch, length - 1) or tuple(requested.shape) != (batch, length - 1, k):
            raise ValueError(
                f"payload: expected response_mask {(batch, length - 1)} and requested_ids "
                f"{(batch, length - 1, k)}, got {mask.shape} and {tuple(requested.shape)}"
            )
        requested_np = requested.numpy()
        spans = scored_spans(attention, mask)

        shape = (batch, length - 1)
        acc = torch.float64 if self.info.get("dtype") == "float64" else torch.float32
        topk_ids = requested.clone()  # filler: valid ids
        topk_log_probs = torch.zeros(shape + (k,), dtype=acc)
        requested_log_probs = torch.zeros(shape + (k,), dtype=acc)
        sampled_log_probs = torch.zeros(shape, dtype=acc)
        entropy = torch.zeros(shape, dtype=acc)
        for group in self._requests(spans, k):
            result = self.client.score(
                [ids[row, begin:end] for row, begin, end, _ in group],
                [first + 1 - begin for _, begin, _, first in group],
                k,
                temperature,
                vocab_limit,
                np.concatenate(
                    [requested_np[row, first : end - 1] for row, _, end, first in group]
                ),
            )
            expected = [end - 1 - first for _, _, end, first in group]
            if result.positions != expected:
                raise ValueError(
                    f"teacher server {self.url} answered {result.positions} positions, "
                    f"expected {expected}"
                )
            offset = 0
            for (row, _, end, first), count in zip(group, expected):
                rows = slice(offset, offset + count)
                where = (row, slice(first, end - 1))
                topk_ids[where] = torch.from_numpy(result.topk_ids[rows].astype(np.int64))
                topk_log_probs[where] = torch.from_numpy(result.topk_log_probs[rows].copy())
                requested_log_probs[where] = torch.from_numpy(
                    result.requested_log_probs[rows].copy()
                )
                sampled_log_probs[where] = torch.from_numpy(result.sampled_log_probs[rows].copy())
                entropy[where] = torch.from_numpy(result.entropy[rows].copy())
                offset += count
        return TeacherPayload(
            topk_ids=topk_ids,
            topk_log_probs=topk_log_probs,
            requested_ids=requested,
            requested_log_probs=requested_log_probs,
            entropy=entropy,
            sampled_log_probs=sampled_log_probs,
        ).map(lambda tensor: tensor.to(device))
