"""The teacher scoring server: `opd-fast serve-teacher --model DIR`.

HTTP/1.1 on the standard library (http.server.ThreadingHTTPServer), keep-alive:

    GET  /health          {"status": "ok"}                      (never needs the token)
    GET  /v1/model-info   vocabulary size, tokenizer fingerprint, k limit, dtype, limits
    POST /v1/score        a score request frame -> a score response frame (protocol.py)

Handler threads read and validate requests, then queue them; one worker thread takes the
queued requests (up to the batch limits, waiting batch_wait_ms for company after the first)
and scores them with one padded forward, each request waiting on its own future.

Security defaults: binds 127.0.0.1 unless told otherwise; with a token, every request but
/health needs `Authorization: Bearer <token>` (constant-time compare) or gets 401. Bodies over
max_request_bytes get 413 (the body is discarded, never parsed), requests over the sequence /
batch limits, the model's positions or with out-of-range values 422, malformed ones 400, a full
queue 503 + Retry-After; errors are JSON {"error": message, "status": code} and the server
keeps serving.

Slow and unauthenticated clients cannot crowd out the others: a new connection's whole request
head (request line and headers) must arrive within header_timeout_s (else 408), and only an
authenticated request gives its connection one of the max_connections slots (kept while it
stays open). Until then a connection is one of at most max_pending_connections, answered once
and closed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hmac
import io
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opd_fast.serving.scorer import (
    RequestError,
    ScoreJob,
    Scorer,
    ServerLimits,
    parse_score_request,
)
from opd_fast.wire import protocol

LOOPBACK = ("127.0.0.1", "::1", "localhost")
MAX_HEAD_BYTES = 65_536  # request line + headers (431 above)
_READ = 65_536
_REASONS = {
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def _plain_answer(status: int, message: str, headers: dict | None = None) -> bytes:
    """A whole JSON error response, for answers sent before (or instead of) parsing a request."""
    body = json.dumps({"error": message, "status": status}).encode()
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}", f"Content-Type: {protocol.JSON_TYPE}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode() + body


class _Ticket:
    """A connection's claim on the server: a pending place until a request on it is
    authenticated (admit), then one of the max_connections slots, until it closes."""

    def __init__(self, pending: threading.BoundedSemaphore, slots: threading.BoundedSemaphore):
        self.accepted = time.monotonic()
        self._pending, self._slots = pending, slots
        self.admitted = self._released = False

    def admit(self) -> bool:
        if not self.admitted:
            if not self._slots.acquire(blocking=False):
                return False
            self._pending.release()
            self.admitted = True
        return True

    def release(self) -> None:
        if not self._released:
            self._released = True
            (self._slots if self.admitted else self._pending).release()


class _Replay(io.RawIOBase):
    """A socket's raw reader that first hands back the bytes pushed back into it: the request
    head, read ahead under its deadline, and whatever came along with it."""

    def __init__(self, raw):
        self._raw, self._pending = raw, b""

    def readable(self) -> bool:
        return True

    def push_back(self, data: bytes) -> None:
        self._pending = data + self._pending

    def readinto(self, buffer) -> int:
        if self._pending:
            count = min(len(buffer), len(self._pending))
            buffer[:count] = self._pending[:count]
            self._pending = self._pending[count:]
            return count
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _Overloaded(Exception):
    pass


class Batcher:
    """Queue of ScoreJobs and the worker thread that scores them in merged batches."""

    def __init__(self, scorer: Scorer, limits: ServerLimits):
        self.scorer = scorer
        self.limits = limits
        self._pending: collections.deque[ScoreJob] = collections.deque()
        self._condition = threading.Condition()
        self._closed = False
        self.stats = {"requests": 0, "forwards": 0, "sequences": 0}
        self._worker = threading.Thread(target=self._run, name="opd-teacher-batcher", daemon=True)
        self._worker.start()

    def submit(self, job: ScoreJob) -> None:
        with self._condition:
            if self._closed:
                raise _Overloaded("server is shutting down")
            if len(self._pending) >= self.limits.max_queue:
                raise _Overloaded(f"{len(self._pending)} requests queued; retry shortly")
            self._pending.append(job)
            self._condition.notify()

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self._worker.join(timeout=30)
        with self._condition:
            while self._pending:
                self._pending.popleft().future.set_exception(_Overloaded("server shut down"))

    def _fitting_prefix(self) -> tuple[int, bool]:
        """How many queued jobs (from the front) fit one forward; whether the batch is full."""
        count, sequences, longest = 0, 0, 0
        for job in self._pending:
            longer = max(longest, max(len(s) for s in job.sequences))
            more = sequences + job.num_sequences
            if count and (
                more > self.limits.max_batch_sequences
                or more * longer > self.limits.max_batch_tokens
            ):
                return count, True
            count, sequences, longest = count + 1, more, longer
        full = sequences >= self.limits.max_batch_sequences
        return count, full

    def _take_batch(self) -> list[ScoreJob]:
        deadline = time.monotonic() + self.limits.batch_wait_ms / 1000
        while True:
            count, full = self._fitting_prefix()
            remaining = deadline - time.monotonic()
            if full or remaining <= 0 or self._closed:
                return [self._pending.popleft() for _ in range(count)]
            self._condition.wait(remaining)

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._pending and not self._closed:
                    self._condition.wait()
                if self._closed:
                    return
                jobs = self._take_batch()
            jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            if not jobs:
                continue
            try:
                results = self.scorer.score(jobs)
            except BaseException as error:  # never let the worker die
                results = [error] * len(jobs)
            self.stats["forwards"] += 1
            self.stats["requests"] += len(jobs)
            self.stats["sequences"] += sum(job.num_sequences for job in jobs)
            for job, result in zip(jobs, results):
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "opd-fast-teacher/1"
    timeout = 60  # seconds a connection may stall while sending a request
    # Headers and body go out in two writes: without TCP_NODELAY, Nagle's algorithm and the
    # client's delayed ACK hold the second one back ~40 ms.
    disable_nagle_algorithm = True

    server: _HTTPServer

    def __init__(self, request, client_address, server, ticket: _Ticket):
        self.ticket = ticket
        super().__init__(request, client_address, server)

    # ---- plumbing --------------------------------------------------------------------

    def setup(self):
        super().setup()
        self.rfile.close()  # read through _Replay instead (the socket stays open)
        self._replay = _Replay(self.connection.makefile("rb", buffering=0))
        self.rfile = io.BufferedReader(self._replay, _READ)

    def handle_one_request(self):
        """Read the request head under its deadline (a new connection's: header_timeout_s
        from its accept; an authenticated keep-alive connection may idle `timeout` seconds),
        then handle the request as http.server does."""
        if self.ticket.admitted:
            deadline = time.monotonic() + self.timeout
        else:
            deadline = self.ticket.accepted + self.server.limits.header_timeout_s
        head = self._read_head(deadline)
        if head is None:
            self.close_connection = True
            return
        self._replay.push_back(head)
        self.connection.settimeout(self.timeout)
        super().handle_one_request()

    def _read_head(self, deadline: float) -> bytes | None:
        """The request head through its blank line (with any bytes that came after it), or
        None when the connection is done: closed, over MAX_HEAD_BYTES (431) or late (408)."""
        head, searched = bytearray(), 0
        while head.find(b"\n\n", searched) < 0 and head.find(b"\n\r\n", searched) < 0:
            searched = max(len(head) - 2, 0)
            if len(head) > MAX_HEAD_BYTES:
                self._refuse(431, f"the request head exceeds {MAX_HEAD_BYTES} bytes")
                return None
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                self.connection.settimeout(remaining)
                chunk = self.rfile.read1(_READ)
            except TimeoutError:
                if head or not self.ticket.admitted:  # an idle keep-alive one just closes
                    limit = self.server.limits.header_timeout_s
                    self._refuse(408, f"the request head did not arrive within {limit:g} s")
                return None
            except OSError:
                return None
            if not chunk:
                return None
            head += chunk
        return bytes(head)

    def _refuse(self, status: int, message: str) -> None:
        self.close_connection = True
        try:
            self.connection.settimeout(1.0)
            self.connection.sendall(_plain_answer(status, message))
        except OSError:
            pass

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None):
        if not self.ticket.admitted:  # answered once, then closed: it holds no slot
            self.close_connection = True
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _json(self, status: int, value: dict, headers: dict | None = None):
        self._send(status, json.dumps(value).encode(), protocol.JSON_TYPE, headers)

    def _discard_body(self, limit: int) -> bool:
        """Read and drop a request body of at most `limit` bytes, so that the client, which
        sends its whole body before reading, sees our answer; False if it is not read."""
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return False
        if self.headers.get("Transfer-Encoding") or not 0 <= length <= limit:
            return False
        # an unauthenticated sender gets header_timeout_s for it, not `timeout` per read
        deadline = None
        if not self.ticket.admitted:
            deadline = time.monotonic() + self.server.limits.header_timeout_s
        try:
            while length > 0:
                if deadline is not None:
                    if deadline <= time.monotonic():
                        return False
                    self.connection.settimeout(deadline - time.monotonic())
                chunk = self.rfile.read(min(length, 1 << 20))
                if not chunk:
                    return False
                length -= len(chunk)
        except OSError:
            return False
        return True

    def _error(self, status: int, message: str, headers: dict | None = None, unread_body=False):
        if unread_body and not self._discard_body(self.server.drain_limit):
            self.close_connection = True  # the connection holds bytes we did not read
        if status >= 500:
            print(f"opd-fast serve-teacher: {status}: {message}", file=sys.stderr, flush=True)
        self._json(status, {"error": message, "status": status}, headers)

    def send_error(self, code, message=None, explain=None):
        """The HTTP layer's own errors (bad request line, unknown method) as JSON too."""
        self.close_connection = True
        self._json(code, {"error": message or explain or "bad request", "status": code})

    def _authorised(self, has_body: bool) -> bool:
        token = self.server.token
        if token is None:
            return True
        given = self.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token):
            return True
        self._error(
            401,
            "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
            {"WWW-Authenticate": 'Bearer realm="opd-fast-teacher"'},
            unread_body=has_body,
        )
        return False

    def _admit(self, has_body: bool) -> bool:
        """Authenticate the request and give its connection a slot (kept while it stays
        open); False when it was answered instead: 401, or 503 when every slot is taken."""
        if not self._authorised(has_body):
            return False
        if self.ticket.admit():
            return True
        self._error(503, "too many connections; retry", {"Retry-After": "1"}, unread_body=has_body)
        return False

    # ---- routes ----------------------------------------------------------------------

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":  # with a token: answered without a slot, then closed
            if self.server.token is None and not self._admit(has_body=False):
                return None
            return self._json(200, {"status": "ok"})
        if not self._admit(has_body=False):
            return None
        if path == "/v1/model-info":
            info = dict(self.server.scorer.info())
            info["limits"] = self.server.limits.to_dict()
            info["auth"] = self.server.token is not None
            return self._json(200, info)
        if path == "/v1/stats":
            return self._json(200, dict(self.server.batcher.stats))
        return self._error(404, f"no such endpoint {path}; see /health, /v1/model-info, /v1/score")

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        if not self._admit(has_body=True):
            return None
        if path != "/v1/score":
            return self._error(404, f"no such endpoint {path}; POST /v1/score", unread_body=True)
        if self.headers.get("Transfer-Encoding"):
            return self._error(411, "send a Content-Length (no chunked bodies)", unread_body=True)
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            return self._error(411, "Content-Length required", unread_body=True)
        try:
            length = int(raw_length)
            if length < 0:
                raise ValueError
        except ValueError:
            return self._error(400, f"bad Content-Length {raw_length!r}", unread_body=True)
        limit = self.server.limits.max_request_bytes
        if length > limit:
            return self._error(
                413,
                f"request body of {length} bytes exceeds the limit of {limit}; split it",
                unread_body=True,
            )
        body = self.rfile.read(length)
        if len(body) != length:
            return self._error(
                400, f"body ended after {len(body)} of {length} bytes", unread_body=True
            )
        try:
            scorer = self.server.scorer
            job = parse_score_request(
                body, self.server.limits, scorer.vocab_size, max_positions=scorer.max_positions
            )
        except RequestError as error:
            return self._error(error.status, error.message)
        try:
            self.server.batcher.submit(job)
        except _Overloaded as error:
            return self._error(503, str(error), {"Retry-After": "1"})
        try:
            answer = job.future.result(timeout=self.server.limits.request_timeout_s)
        except concurrent.futures.TimeoutError:
            job.future.cancel()
            return self._error(503, "scoring timed out; retry", {"Retry-After": "1"})
        except _Overloaded as error:
            return self._error(503, str(error), {"Retry-After": "1"})
        except Exception as error:
            return self._error(500, f"scoring failed: {type(error).__name__}: {error}")
        return self._send(200, answer, protocol.CONTENT_TYPE)

    def _not_allowed(self):
        self._error(405, f"method {self.command} not allowed", unread_body=True)

    do_PUT = do_DELETE = do_PATCH = _not_allowed


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    # The listen backlog (socketserver's default is 5): a burst of clients connecting at once
    # must wait in the kernel's queue, not be reset.
    request_queue_size = 128

    def __init__(self, address, scorer, batcher, limits, token, verbose):
        self.scorer, self.batcher, self.limits, self.verbose = scorer, batcher, limits, verbose
        # bodies up to this size are read and dropped before an error answer (see _discard_body)
        self.drain_limit = 4 * limits.max_request_bytes
        self.token = None if token is None else token.encode()
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        self._pending = threading.BoundedSemaphore(limits.max_pending_connections)
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):
        """One thread per connection: at most max_pending_connections not yet authenticated
        (each for at most header_timeout_s before its head is in) and max_connections
        authenticated ones (see _Ticket); the next get 503."""
        if not self._pending.acquire(blocking=False):
            try:
                request.sendall(
                    _plain_answer(503, "too many connections; retry", {"Retry-After": "1"})
                )
            except OSError:
                pass
            self.shutdown_request(request)
            return
        ticket = _Ticket(self._pending, self._slots)
        thread = threading.Thread(
            target=self._serve, args=(request, client_address, ticket), daemon=True
        )
        try:
            thread.start()
        except BaseException:
            ticket.release()
            self.shutdown_request(request)
            raise

    def _serve(self, request, client_address, ticket: _Ticket) -> None:
        try:
            self.RequestHandlerClass(request, client_address, self, ticket)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            ticket.release()
            self.shutdown_request(request)

    def handle_error(self, request, client_address):
        if self.verbose:
            super().handle_error(request, client_address)


class TeacherServer:
    """The scoring server around a Scorer. start() serves from a background thread (tests,
    notebooks); serve_forever() blocks (the CLI). Use as a context manager to close it."""

    def __init__(
        self,
        scorer: Scorer,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        limits: ServerLimits | None = None,
        verbose: bool = False,
    ):
        if token is not None and not token:
            raise ValueError("token must be non-empty (or None for no authentication)")
        self.scorer = scorer
        self.limits = limits or ServerLimits()
        self.batcher = Batcher(scorer, self.limits)
        self.httpd = _HTTPServer((host, port), scorer, self.batcher, self.limits, token, verbose)
        self.host, self.port = host, self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> TeacherServer:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.2)

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=10)
        self.httpd.server_close()
        self.batcher.close()

    def __enter__(self) -> TeacherServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- command line --------------------------------------------------------------------------
