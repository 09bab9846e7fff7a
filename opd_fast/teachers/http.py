"""HTTP client of the teacher server: keep-alive connections, timeouts, retries with backoff.

Transient failures (connection refused or reset, timeouts, a truncated answer, HTTP 408, 425,
429, 500, 502, 503, 504) are retried with exponential backoff and jitter until the policy's
time budget is spent (default 120 s: long enough to bridge a server restart), honouring
Retry-After. Permanent ones (other 4xx: a malformed or oversize request, a wrong token) raise
at once with the server's message. Scoring is idempotent, so retrying a request is safe.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import threading
import time
import urllib.parse
from dataclasses import dataclass

import numpy as np

from opd_fast.wire import protocol

logger = logging.getLogger("opd_fast.teachers")

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class TeacherError(RuntimeError):
    """Base class of the teacher client's errors."""


class TeacherRequestError(TeacherError):
    """The server refused the request (4xx); retrying it would not help."""

    def __init__(self, status: int, message: str, url: str = ""):
        super().__init__(f"teacher server {url} answered {status}: {message}")
        self.status = status
        self.message = message


class TeacherAuthError(TeacherRequestError):
    """401/403: the token is missing or wrong."""


class TeacherUnavailableError(TeacherError):
    """The server could not be reached (or kept failing) within the retry budget."""


class TeacherProtocolError(TeacherError):
    """The server's answer is not what the wire format says."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: delay_n = min(max_delay, initial * multiplier**n),
    each scaled by uniform(1 - jitter, 1); stop once max_elapsed_s have passed since the first
    attempt (or after max_attempts, if set)."""

    max_elapsed_s: float = 120.0
    initial_delay_s: float = 0.1
    max_delay_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5
    max_attempts: int | None = None

    def __post_init__(self):
        if self.max_elapsed_s < 0 or self.initial_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError("retry policy: times must be >= 0")
        if self.multiplier < 1 or not 0 <= self.jitter <= 1:
            raise ValueError("retry policy: multiplier must be >= 1 and jitter in [0, 1]")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("retry policy: max_attempts must be >= 1")

    def delay(self, attempt: int) -> float:
        base = min(self.max_delay_s, self.initial_delay_s * self.multiplier**attempt)
        return base * random.uniform(1 - self.jitter, 1)


NO_RETRY = RetryPolicy(max_elapsed_s=0, max_attempts=1)


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None, stale: bool = False):
        super().__init__(reason)
        self.retry_after = retry_after
        self.stale = stale  # a reused keep-alive connection the server had closed


def _error_message(body: bytes) -> str:
    """The message of a JSON error body: ours {"error": str}, OpenAI-style
    {"error": {"message": str}} or {"message": str}; else the body's start."""
    try:
        value = json.loads(body)
        error = value.get("error", value.get("message"))
        if isinstance(error, dict) and "message" in error:
            error = error["message"]
        if error is not None:
            return str(error)
    except (ValueError, AttributeError):
        pass
    return body[:500].decode(errors="replace") or "(no message)"


class HttpTransport:
    """Requests to one base URL over keep-alive http.client connections (one per thread)."""

    def __init__(
        self,
        url: str,
        headers: dict[str, str] | None = None,
        timeout: float = 300.0,
        retry: RetryPolicy | None = None,
    ):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"teacher URL must be http(s)://host[:port][/prefix], got {url!r}")
        self.url = url.rstrip("/")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._local = threading.local()

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection, and whether it has been used before."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            connection = kind(self._host, self._port, timeout=self.timeout)
            self._local.connection = connection
            return connection, False
        return connection, True

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None

    def _once(self, method: str, path: str, body: bytes | None, content_type: str | None):
        headers = dict(self.headers)
        if content_type:
            headers["Content-Type"] = content_type
        connection, reused = self._connection()
        try:
            connection.request(method, self._prefix + path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as error:
            self.close()  # the connection's state is unknown: start afresh
            # The server closes idle keep-alive connections: the first request on one fails.
            stale = reused and isinstance(
                error, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
            )
            raise _Retryable(f"{type(error).__name__}: {error}", stale=stale) from None
        if response.getheader("Connection", "").lower() == "close":
            self.close()
        if response.status == 200:
            return response, data
        message = _error_message(data)
        if response.status in RETRYABLE_STATUS:
            retry_after = response.getheader("Retry-After")
            try:
                seconds = float(retry_after) if retry_after else None
            except ValueError:
                seconds = None
            raise _Retryable(f"HTTP {response.status}: {message}", seconds)
        error_type = TeacherAuthError if response.status in (401, 403) else TeacherRequestError
        raise error_type(response.status, message, self.url)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> tuple[http.client.HTTPResponse, bytes]:
        """(response, body) of the first 200 answer; raises TeacherRequestError at once on a
        permanent error, TeacherUnavailableError once the retry budget is spent."""
        policy = retry or self.retry
        started = time.monotonic()
        attempt, stale_retried = 0, False
        while True:
            try:
                return self._once(method, path, body, content_type)
            except _Retryable as error:
                if error.stale and not stale_retried:
                    stale_retried = True  # once, at once, on a new connection
                    continue
                attempt += 1
                elapsed = time.monotonic() - started
                delay = policy.delay(attempt - 1)
                if error.retry_after is not None:
                    delay = max(delay, min(error.retry_after, policy.max_delay_s))
                out_of_attempts = policy.max_attempts is not None and attempt >= policy.max_attempts
                if out_of_attempts or elapsed + delay > policy.max_elapsed_s:
                    raise TeacherUnavailableError(
                        f"teacher server {self.url} unavailable: {method} {path} failed "
                        f"{attempt} time(s) over {elapsed:.1f} s (waiting up to "
                        f"{policy.max_elapsed_s:g} s); last error: {error}"
                    ) from None
                if attempt == 1:
                    logger.warning(
                        "teacher server %s: %s; retrying for up to %.0f s",
                        self.url,
                        error,
                        policy.max_elapsed_s,
                    )
                time.sleep(delay)


@dataclass
class ScoreResult:
    """A score response: per response position (all sequences' positions concatenated)."""

    positions: list[int]  # response positions of each sequence
    topk_ids: np.ndarray  # (P, k) int32
    topk_log_probs: np.ndarray  # (P, k)
    requested_log_probs: np.ndarray | None  # (P, k), when requested ids were sent
    sampled_log_probs: np.ndarray  # (P,)
    entropy: np.ndarray  # (P,)


class TeacherClient:
    """Client of `opd-fast serve-teacher` (see opd_fast.wire.protocol)."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 300.0,
        retry: RetryPolicy | None = None,
    ):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.transport = HttpTransport(url, headers, timeout, retry)
        self.url = self.transport.url

    def _json(self, path: str, retry: RetryPolicy | None = None) -> dict:
        _, body = self.transport.request("GET", path, retry=retry)
        try:
            return json.loads(body)
        except ValueError:
            raise TeacherProtocolError(f"{self.url}{path}: answer is not JSON") from None

    def health(self, retry: RetryPolicy | None = None) -> dict:
        return self._json("/health", retry)

    def model_info(self, retry: RetryPolicy | None = None) -> dict:
        return self._json("/v1/model-info", retry)

    def score(
        self,
        sequences: list[np.ndarray],
        response_starts: list[int],
        k: int,
        temperature: float = 1.0,
        vocab_limit: int | None = None,
        requested_ids: np.ndarray | None = None,
    ) -> ScoreResult:
        """Score B sequences (token id arrays); response positions of sequence i are
        response_starts[i] - 1 .. len - 2; requested_ids (P, k) or None."""
        body = protocol.encode_score_request(
            sequences, response_starts, k, temperature, vocab_limit, requested_ids
        )
        return self.score_encoded(body, requested_ids is not None)

    def score_encoded(self, body: bytes, with_requested: bool) -> ScoreResult:
        _, answer = self.transport.request("POST", "/v1/score", body, protocol.CONTENT_TYPE)
        try:
            header, arrays = protocol.decode_score_response(answer)
        except protocol.ProtocolError as error:
            raise TeacherProtocolError(f"{self.url}: bad score response: {error}") from None
        if with_requested != ("requested_log_probs" in arrays):
            raise TeacherProtocolError(f"{self.url}: requested_log_probs missing or unasked")
        return ScoreResult(
            positions=[int(p) for p in header["positions"]],
            topk_ids=arrays["topk_ids"],
            topk_log_probs=arrays["topk_log_probs"],
            requested_log_probs=arrays.get("requested_log_probs"),
            sampled_log_probs=arrays["sampled_log_probs"],
            entropy=arrays["entropy"],
        )

    def close(self) -> None:
        self.transport.close()
