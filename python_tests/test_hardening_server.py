"""A hostile client gets a named answer and cannot crowd out the others (issue 23, item 3):
deeply nested or huge frame headers are a 400 on a connection that stays usable, a request
head must arrive whole within header_timeout_s (408), only an authenticated request takes one
of the max_connections slots (300 slow sockets at the default limits leave an authenticated
client answered within 2 s), and a sequence beyond the model's positions is a 422."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import numpy as np
import pytest

from opd_fast.models.loading import CPU_FP32, load_model, load_tokenizer
from opd_fast.serving.scorer import Scorer, ServerLimits
from opd_fast.serving.server import TeacherServer
from opd_fast.toy.tiny import tiny_setup
from opd_fast.wire import protocol

TOKEN = "s3cret"
AUTH = {"Content-Type": protocol.CONTENT_TYPE, "Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    tiny = tiny_setup(str(tmp_path_factory.mktemp("tiny")))
    model = load_model(tiny["teacher"], CPU_FP32, False)
    return Scorer(model, load_tokenizer(tiny["teacher"]), tiny["teacher"])


@pytest.fixture
def make_server(scorer):
    servers = []

    def make(token=TOKEN, **limits):
        servers.append(TeacherServer(scorer, token=token, limits=ServerLimits(**limits)).start())
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def _body(length=6, k=4):
    return protocol.encode_score_request(
        [np.arange(length) % 100], [2], k, 1.0, None, np.zeros((length - 2, k), np.int64)
    )


def _frame(header: bytes) -> bytes:
    header += b" " * (-(8 + len(header)) % 8)
    return b"OPDW" + len(header).to_bytes(4, "little") + header


def _post(connection: http.client.HTTPConnection, body: bytes, headers=AUTH):
    connection.request("POST", "/v1/score", body=body, headers=headers)
    answer = connection.getresponse()
    return answer.status, dict(answer.getheaders()), answer.read()


# ---- the frame decoder bounds its header ----------------------------------------------------


def test_a_100000_deep_header_is_a_400_and_the_connection_stays_usable(make_server):
    nested = _frame(b'{"version": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    with pytest.raises(protocol.ProtocolError, match="header nests 100001 deep; at most 32"):
        protocol.decode_frame(nested)
    server = make_server()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    status, headers, data = _post(connection, nested)
    assert status == 400 and "nests 100001 deep" in json.loads(data)["error"]
    assert headers.get("Connection") != "close"
    assert _post(connection, _body())[0] == 200  # the same connection
    connection.close()


def test_a_header_over_the_limit_is_a_400(make_server):
    valid = _body()
    length = int.from_bytes(valid[4:8], "little")
    header = json.loads(valid[8 : 8 + length])
    header["note"] = "x" * (2 << 20)  # metadata the server ignores, 2 MiB of it
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    body = b"OPDW" + len(text).to_bytes(4, "little") + text + valid[8 + length :]
    connection = http.client.HTTPConnection("127.0.0.1", make_server().port, timeout=10)
    status, _, data = _post(connection, body)
    assert status == 400
    assert f"exceeds the limit of {protocol.MAX_HEADER_BYTES}" in json.loads(data)["error"]
    connection.close()


# ---- slow and unauthenticated connections ---------------------------------------------------


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_head_that_trickles_in_gets_408_at_the_deadline(make_server):
    server = make_server(header_timeout_s=1.0)
    trickling, silent = _connect(server.port), _connect(server.port)
    started = time.monotonic()
    for byte in b"POST /v1/score HTTP/1.1\r\nHost: x\r\n":  # one byte every 0.1 s
        try:
            trickling.sendall(bytes([byte]))
        except OSError:
            break
        time.sleep(0.1)
    answers = [_read_all(trickling), _read_all(silent)]
    assert time.monotonic() - started < 5
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408") and b"within 1 s" in answer
    trickling.close()
    silent.close()


def test_unauthenticated_requests_are_answered_once_and_closed(make_server):
    server = make_server()
    for request in (
        b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
        b"GET /v1/model-info HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
    ):
        sock = _connect(server.port)
        sock.sendall(request)
        answer = _read_all(sock)  # ends: the server closed the connection
        assert b"Connection: close" in answer
        assert answer.startswith((b"HTTP/1.1 401", b"HTTP/1.1 200"))
        sock.close()


def test_pending_connections_over_their_limit_get_503(make_server):
    server = make_server(max_pending_connections=2)
    held = [_connect(server.port) for _ in range(2)]
    time.sleep(0.2)
    extra = _connect(server.port)
    answer = _read_all(extra)
    assert answer.startswith(b"HTTP/1.1 503") and b"too many connections" in answer
    for sock in [*held, extra]:
        sock.close()


class _SlowClients:
    """`count` connections that never finish a request: a third send their head a byte a
    second, a third send nothing, a third send a head with a wrong token and then a body a
    byte a second."""

    def __init__(self, port: int, count: int):
        self.sockets = [_connect(port) for _ in range(count)]
        wrong = b"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer no\r\n"
        self.pending = []
        for index, sock in enumerate(self.sockets):
            if index % 3 == 0:
                self.pending.append(
                    b"POST /v1/score HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: y\r\n" * 50
                )
            elif index % 3 == 1:
                self.pending.append(b"")
            else:
                sock.sendall(wrong + b"Content-Length: 100000\r\n\r\n")
                self.pending.append(b"z" * 1000)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, daemon=True)

    def _trickle(self):
        while not self._stop.wait(1.0):
            for index, sock in enumerate(self.sockets):
                if self.pending[index]:
                    try:
                        sock.sendall(self.pending[index][:1])
                    except OSError:
                        self.pending[index] = b""
                    self.pending[index] = self.pending[index][1:]

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
        for sock in self.sockets:
            sock.close()


def test_300_slow_connections_leave_an_authenticated_client_answered_within_2_s(make_server):
    server = make_server()  # the default limits
    assert server.limits.max_connections < 300  # enough to lock everyone out before
    with _SlowClients(server.port, 300):
        time.sleep(1.5)  # every slow one connected and sending
        latencies = []
        for _ in range(3):
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            started = time.monotonic()
            status, _, data = _post(connection, _body())
            latencies.append(time.monotonic() - started)
            assert status == 200, data[:200]
            connection.close()
    assert max(latencies) < 2.0, latencies


# ---- the model's positions ------------------------------------------------------------------


def test_a_sequence_beyond_the_model_positions_is_a_422(make_server, scorer):
    positions = scorer.model.config.max_position_embeddings
    connection = http.client.HTTPConnection("127.0.0.1", make_server().port, timeout=30)
    status, _, data = _post(connection, _body(length=positions + 1))
    assert status == 422, status  # before: scored, at positions the model never learned
    assert f"at most {positions} positions (max_position_embeddings)" in json.loads(data)["error"]
    assert _post(connection, _body(length=positions))[0] == 200
    connection.close()
    assert scorer.info()["max_positions"] == positions
