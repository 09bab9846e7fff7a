"""RemoteTeacher: a payload teacher over `opd-fast serve-teacher`.

The teacher factory builds it when the config names `teacher_url` (and `teacher_token`). Per
batch it sends only the response positions of each sequence (with the student's top-k ids there),
split into requests within the server's limits, and scatters the answers back into
(B, L-1, ...) tensors. Every variant but full_vocab and every metric come out exactly as with
the teacher in process (docs/math.md, Teacher payload).
"""

from __future__ import annotations

import numpy as np

from opd_fast.models.vocabulary import tokenizer_fingerprint
from opd_fast.teachers.base import PAYLOAD_VARIANTS, PayloadScoring
from opd_fast.teachers.http import TeacherClient
from opd_fast.teachers.payload_batch import PayloadBatch
from opd_fast.wire import protocol


class RemoteTeacher(PayloadScoring):
    """A payload teacher (opd_fast.teachers.base) backed by a teacher server.

    url: http(s)://host:port of `opd-fast serve-teacher`; token: its bearer token.
    client_options: TeacherClient's (timeout per HTTP attempt; retry: the backoff policy,
    by default transient failures are retried for up to 120 s, bridging a server restart).
    """

    def __init__(self, url: str, token: str | None = None, **client_options):
        self.client = TeacherClient(url, token=token, **client_options)
        self.url = self.client.url
        self.info = self.client.model_info()
        if self.info.get("protocol_version") != protocol.VERSION:
            raise ValueError(
                f"teacher server {self.url} speaks wire format "
                f"{self.info.get('protocol_version')!r}; this client speaks {protocol.VERSION}"
            )
        self.answer_dtype = np.float64 if self.info.get("dtype") == "float64" else np.float32
        self.vocab_size = int(self.info["vocab_size"])
        self.variants = PAYLOAD_VARIANTS
        self.max_k = int(self.info["max_k"])
        self.limits = self.info["limits"]

    def check_tokenizer(self, tokenizer) -> None:
        """Raise ValueError unless the server's tokenizer is the student's (same fingerprint)."""
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

    def check_request(self, k: int, temperature: float, vocab_limit: int) -> None:
        if not 1 <= k <= min(self.max_k, vocab_limit):
            raise ValueError(f"k must be in [1, min({self.max_k}, {vocab_limit})], got {k}")
        if vocab_limit > self.vocab_size:
            raise ValueError(
                f"vocab_limit {vocab_limit} exceeds the teacher's {self.vocab_size} output rows"
            )

    def answer(self, batch: PayloadBatch, k: int, temperature: float, vocab_limit: int) -> None:
        """One request per group of spans within the server's limits; the answers fill `batch`."""
        requested = batch.requested.numpy()
        for group in self._requests(batch.spans, k):
            result = self.client.score(
                [batch.sequence(span) for span in group],
                [first + 1 - begin for _, begin, _, first in group],
                k,
                temperature,
                vocab_limit,
                np.concatenate([requested[row, first : end - 1] for row, _, end, first in group]),
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
                batch.fill(
                    row,
                    slice(first, end - 1),
                    **{name: getattr(result, name)[rows] for name in protocol.RESPONSE_ARRAYS},
                )
                offset += count
