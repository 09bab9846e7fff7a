"""Exact teacher scoring for the server: request validation and one padded forward per batch.

The arithmetic is the in-process trainer's: sequences right-padded with explicit position ids
(opd_fast.models.batch, as the trainer's rollout batches are), the model's logits at the
response positions sliced to `vocab_limit` columns, then opd_fast.op.payload.payload_from_logits
(the fused row_topk op) at the requested temperature, in the dtype the trainer would use
(float32 on CPU).
"""

from __future__ import annotations

import inspect
import math
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from opd_fast.models.batch import right_padded
from opd_fast.models.hub import resolve_model
from opd_fast.models.loading import Placement, load_model, load_tokenizer
from opd_fast.models.vocabulary import output_rows, tokenizer_fingerprint
from opd_fast.op.names import MAX_K, smallest_temperature
from opd_fast.op.payload import payload_from_logits
from opd_fast.wire import protocol


@dataclass(frozen=True)
class ServerLimits:
    """Per-request limits (a request over them is refused) and per-forward batch sizes.

    A request may hold at most max_batch_sequences sequences, each at most max_seq_len
    tokens, and at most max_batch_tokens padded tokens (sequences x longest); concurrent
    requests are merged into one forward while the merged batch stays within the same two
    batch limits. The server's logits memory is about max_batch_tokens x V x dtype bytes.
    """

    max_request_bytes: int = 64 * 2**20
    max_seq_len: int = 32_768
    max_batch_sequences: int = 256
    max_batch_tokens: int = 32_768
    max_queue: int = 1024  # requests waiting for the model; more get 503 + Retry-After
    # connections with an authenticated request (a thread each, while they stay open); more 503
    max_connections: int = 256
    # connections not authenticated yet (a thread each, for header_timeout_s at most); more 503
    max_pending_connections: int = 1024
    header_timeout_s: float = 10.0  # a new connection's whole request head, or 408
    batch_wait_ms: float = 2.0  # how long the first queued request waits for company
    request_timeout_s: float = 600.0  # a request not scored by then gets 503

    def __post_init__(self):
        for name in (
            "max_request_bytes",
            "max_seq_len",
            "max_batch_sequences",
            "max_queue",
            "max_connections",
            "max_pending_connections",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"server limits: {name} must be >= 1, got {getattr(self, name)}")
        if self.max_batch_tokens < self.max_seq_len:
            raise ValueError(
                f"server limits: max_batch_tokens ({self.max_batch_tokens}) must be >= "
                f"max_seq_len ({self.max_seq_len})"
            )
        if not self.batch_wait_ms >= 0:
            raise ValueError(f"server limits: batch_wait_ms must be >= 0, got {self.batch_wait_ms}")
        if not self.header_timeout_s > 0:
            raise ValueError(
                f"server limits: header_timeout_s must be > 0, got {self.header_timeout_s}"
            )

    def to_dict(self) -> dict:
        return {
            "max_request_bytes": self.max_request_bytes,
            "max_seq_len": self.max_seq_len,
            "max_batch_sequences": self.max_batch_sequences,
            "max_batch_tokens": self.max_batch_tokens,
        }


class RequestError(Exception):
    """A request the server refuses: HTTP status and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class ScoreJob:
    """One validated score request, waiting for (or being) scored."""

    sequences: list[np.ndarray]  # B int64 arrays
    response_starts: list[int]
    k: int
    temperature: float
    vocab_limit: int
    requested_ids: np.ndarray | None  # (P, k) int64
    future: Future = field(default_factory=Future)

    @property
    def num_sequences(self) -> int:
        return len(self.sequences)

    @property
    def padded_tokens(self) -> int:
        return len(self.sequences) * max(len(s) for s in self.sequences)

    @property
    def positions(self) -> list[int]:
        return [len(s) - start for s, start in zip(self.sequences, self.response_starts)]


def _int_list(header: dict, name: str) -> list[int]:
    values = header.get(name)
    if not isinstance(values, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        raise RequestError(400, f"header.{name} must be a list of ints")
    return values


def _ids(arrays, name: str, shape: tuple, shape_note: str, limit: int, limit_name: str):
    """arrays[name] checked to be int32 of `shape` with every id in [0, limit), as int64."""
    values = arrays[name]
    if values.dtype != protocol.DTYPES["int32"] or values.shape != shape:
        raise RequestError(
            400,
            f"{name} must be int32 of shape {shape}{shape_note}, got {values.dtype} {values.shape}",
        )
    values = values.astype(np.int64)
    if values.size and (values.min() < 0 or values.max() >= limit):
        raise RequestError(422, f"{name} must be in [0, {limit_name})")
    return values


def parse_score_request(
    body: bytes,
    limits: ServerLimits,
    model_rows: int,
    max_k: int = MAX_K,
    max_positions: int | None = None,
) -> ScoreJob:
    """Decode and validate a score request; raises RequestError (400 malformed, 422 values or
    limits) with a message naming the problem. max_positions: the model's position limit
    (max_position_embeddings; None: none)."""
    try:
        header, arrays = protocol.decode_frame(body)
    except protocol.ProtocolError as error:
        raise RequestError(400, f"malformed frame: {error}") from None
    lengths = _int_list(header, "lengths")
    starts = _int_list(header, "response_starts")
    k, vocab_limit, temperature = (
        header.get("k"),
        header.get("vocab_limit"),
        header.get("temperature"),
    )
    if not isinstance(k, int) or isinstance(k, bool):
        raise RequestError(400, "header.k must be an int")
    if vocab_limit is None:
        vocab_limit = model_rows
    if not isinstance(vocab_limit, int) or isinstance(vocab_limit, bool):
        raise RequestError(400, "header.vocab_limit must be an int or null")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise RequestError(400, "header.temperature must be a number")
    unknown = set(arrays) - {"token_ids", "requested_ids"}
    if unknown:
        raise RequestError(
            400, f"unknown arrays {sorted(unknown)}; expected token_ids, requested_ids"
        )
    if "token_ids" not in arrays:
        raise RequestError(400, "missing array token_ids")
    if len(lengths) != len(starts):
        raise RequestError(
            400, f"{len(lengths)} lengths but {len(starts)} response_starts; one each per sequence"
        )

    if not 1 <= vocab_limit <= model_rows:
        raise RequestError(422, f"vocab_limit must be in [1, {model_rows}], got {vocab_limit}")
    if not 1 <= k <= min(max_k, vocab_limit):
        raise RequestError(
            422, f"k must be in [1, min({max_k}, vocab_limit={vocab_limit})], got {k}"
        )
    try:  # an int of 400 digits overflows a float
        finite = math.isfinite(temperature)
    except OverflowError:
        finite = False
    if not (finite and temperature > 0):
        raise RequestError(422, f"temperature must be positive and finite, got {temperature!s:.24}")
    if temperature < smallest_temperature():
        # The teacher scales by 1 / temperature in float32 (the kernels' accumulation type).
        raise RequestError(
            422,
            f"temperature {temperature!s:.24} is too small: 1 / temperature overflows float32 "
            f"(use temperature >= {smallest_temperature()})",
        )
    if not lengths:
        raise RequestError(422, "no sequences")
    if len(lengths) > limits.max_batch_sequences:
        raise RequestError(
            422,
            f"{len(lengths)} sequences in one request; this server takes at most "
            f"{limits.max_batch_sequences} (split the batch)",
        )
    longest = max(lengths)
    if longest > limits.max_seq_len:
        raise RequestError(
            422,
            f"a sequence has {longest} tokens; this server's max_seq_len is {limits.max_seq_len}",
        )
    if max_positions is not None and longest > max_positions:  # beyond: invented positions
        raise RequestError(
            422,
            f"a sequence has {longest} tokens; the model takes at most {max_positions} "
            "positions (max_position_embeddings)",
        )
    if len(lengths) * longest > limits.max_batch_tokens:
        raise RequestError(
            422,
            f"{len(lengths)} sequences x {longest} tokens (padded) exceed this server's "
            f"max_batch_tokens {limits.max_batch_tokens} (split the batch)",
        )
    for index, (length, start) in enumerate(zip(lengths, starts)):
        if length < 1 or not 1 <= start <= length:
            raise RequestError(
                422,
                f"sequence {index}: response_start must be in [1, length] and length >= 1, "
                f"got start {start}, length {length}",
            )
    token_ids = _ids(arrays, "token_ids", (sum(lengths),), "", model_rows, str(model_rows))
    sequences = np.split(token_ids, np.cumsum(lengths)[:-1])
    for index, (sequence, start) in enumerate(zip(sequences, starts)):
        if sequence[start:].size and sequence[start:].max() >= vocab_limit:
            raise RequestError(
                422, f"sequence {index}: a response token is >= vocab_limit {vocab_limit}"
            )
    requested = None
    if "requested_ids" in arrays:
        positions = sum(length - start for length, start in zip(lengths, starts))
        requested = _ids(
            arrays,
            "requested_ids",
            (positions, k),
            " (response positions x k)",
            vocab_limit,
            f"vocab_limit={vocab_limit}",
        )
    return ScoreJob(sequences, starts, k, float(temperature), vocab_limit, requested)


class Scorer:
    """A causal LM and its tokenizer; scores batches of ScoreJobs exactly (see module doc)."""

    def __init__(self, model, tokenizer, model_path: str = "", max_k: int = MAX_K):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.max_k = max_k
        self.gather_bytes = 1 << 25  # above: score per-sequence views instead of a gathered copy
        self.vocab_size = output_rows(model)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.fingerprint = tokenizer_fingerprint(tokenizer)

    @classmethod
    def from_path(
        cls,
        path: str,
        device: str = "auto",
        dtype: str = "auto",
        attention: str = "auto",
        revision: str | None = None,
    ) -> Scorer:
        """Load a Hugging Face model directory, a Hub id (ORG/NAME at `revision`, through the
        Hugging Face cache) or "toy" (the toy default's teacher)."""
        from opd_fast.toy import resolve_toy

        path = resolve_model(resolve_toy({"teacher": path}, progress=False)["teacher"], revision)
        model = load_model(path, Placement.resolve(device, dtype, attention), False)
        return cls(model, load_tokenizer(path), path)

    def info(self) -> dict:
        return {
            "protocol_version": protocol.VERSION,
            "model": self.model_path,
            "vocab_size": self.vocab_size,
            "tokenizer_size": len(self.tokenizer),
            "tokenizer_fingerprint": self.fingerprint,
            "max_k": self.max_k,
            "max_positions": self.max_positions,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
        }

    @torch.inference_mode()
    def score(self, jobs: list[ScoreJob]) -> list[bytes | Exception]:
        """One padded forward for all jobs' sequences; an encoded response (or the exception)
        per job. A failing forward of several jobs is retried job by job, so that one bad
        request cannot fail the others."""
        try:
            logits, rows_of = self._forward([s for job in jobs for s in job.sequences], jobs)
        except Exception as error:  # e.g. out of memory: isolate the culprit
            if len(jobs) > 1:
                return [self.score([job])[0] for job in jobs]
            return [error]
        results: list[bytes | Exception] = []
        for index, job in enumerate(jobs):
            try:
                results.append(self._payload(job, logits, rows_of[index]))
            except Exception as error:
                results.append(error)
        return results

    def _forward(self, sequences: list[np.ndarray], jobs: list[ScoreJob]):
        """Logits (B, S, V) of the last S positions of the right-padded batch, S covering every
        response position, and per job the (batch row, kept position) of its response rows."""
        tokens = right_padded(sequences, self.pad_id)
        length = tokens.input_ids.shape[1]
        first_position = min(
            start - 1 for job in jobs for start in job.response_starts
        )  # the earliest response position; logits before it are never read
        keep = length - first_position
        kwargs = {"logits_to_keep": keep} if self._keeps_logits else {}
        logits = self.model(
            input_ids=tokens.input_ids.to(self.device),
            attention_mask=tokens.attention_mask.to(self.device),
            position_ids=tokens.position_ids.to(self.device),
            use_cache=False,
            **kwargs,
        ).logits
        offset = length - logits.shape[1]  # kept position p holds sequence position p + offset
        rows_of, row = [], 0
        for job in jobs:
            batch_rows, kept = [], []
            for sequence, start in zip(job.sequences, job.response_starts):
                positions = np.arange(start - 1, len(sequence) - 1)
                batch_rows.append(np.full(len(positions), row))
                kept.append(positions - offset)
                row += 1
            rows_of.append((np.concatenate(batch_rows), np.concatenate(kept)))
        return logits, rows_of

    def _payload(self, job: ScoreJob, logits: torch.Tensor, rows) -> bytes:
        batch_rows, kept = rows
        k = job.k
        if len(batch_rows):
            index_rows = torch.from_numpy(batch_rows).to(self.device)
            index_kept = torch.from_numpy(kept).to(self.device)
            sampled = torch.from_numpy(
                np.concatenate([s[start:] for s, start in zip(job.sequences, job.response_starts)])
            ).to(self.device)
            requested = (
                torch.from_numpy(job.requested_ids).to(self.device)
                if job.requested_ids is not None
                else torch.empty((len(batch_rows), 0), dtype=torch.long, device=self.device)
            )
            names = ["topk_ids", "topk_log_probs", "sampled_log_probs", "entropy"]
            if job.requested_ids is not None:
                names.append("requested_log_probs")
            parts = {name: [] for name in names}
            rows_bytes = len(batch_rows) * job.vocab_limit * logits.element_size()
            if rows_bytes <= self.gather_bytes:
                # small: gather the response rows (a copy) and run the top-k pass once
                pieces = [(logits[index_rows, index_kept, : job.vocab_limit], slice(None))]
            else:
                # large: each sequence's response rows are a strided view of the logits (no
                # copy); row_topk reads rows with any row stride
                pieces, offset = [], 0
                for sequence, start in zip(job.sequences, job.response_starts):
                    count = len(sequence) - start
                    if count:
                        row, first = int(batch_rows[offset]), int(kept[offset])
                        view = logits[row, first : first + count, : job.vocab_limit]
                        pieces.append((view, slice(offset, offset + count)))
                    offset += count
            for job_logits, rows_here in pieces:
                payload = payload_from_logits(
                    job_logits, requested[rows_here], k, job.temperature, sampled[rows_here]
                )
                for name in names:
                    parts[name].append(getattr(payload, name).cpu())
            arrays = {name: torch.cat(parts[name]).numpy() for name in names}
        else:
            acc = np.float64 if self.dtype == torch.float64 else np.float32
            arrays = {
                "topk_ids": np.zeros((0, k), np.int32),
                "topk_log_probs": np.zeros((0, k), acc),
                "sampled_log_probs": np.zeros(0, acc),
                "entropy": np.zeros(0, acc),
            }
            if job.requested_ids is not None:
                arrays["requested_log_probs"] = np.zeros((0, k), acc)
        return protocol.encode_score_response(k, job.vocab_limit, job.positions, arrays)
