"""Teacher serving: wire format, exact scoring against the in-process path, the RemoteTeacher
payload and training equivalence, security defaults and limits, client retries, and the
OpenAI-compatible adapter against a fake engine. Every server runs on a free 127.0.0.1 port
and is closed by its fixture."""

from __future__ import annotations

import http.client
import json
import logging
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from serving_helpers import (
    FakeOpenAIServer,
    assert_close_records,
    free_port,
    reference_scores,
)

import opd_fast
from opd_fast.models.loading import CPU_FP32, load_model, load_tokenizer
from opd_fast.op import kernels
from opd_fast.op.payload import TeacherPayload, payload_from_logits
from opd_fast.serving.scorer import Scorer, ServerLimits
from opd_fast.serving.server import TeacherServer
from opd_fast.teachers.http import (
    RetryPolicy,
    TeacherAuthError,
    TeacherClient,
    TeacherRequestError,
    TeacherUnavailableError,
)
from opd_fast.teachers.local import LocalTeacher
from opd_fast.teachers.openai import SUPPORTED_VARIANTS, OpenAITeacher
from opd_fast.teachers.payload_batch import ScoredSpan, scored_spans
from opd_fast.teachers.remote import RemoteTeacher
from opd_fast.toy.tiny import save_tiny_model, tiny_setup, tiny_tokenizer
from opd_fast.training.config import make_config
from opd_fast.training.trainer import Trainer
from opd_fast.wire import protocol

PADDING = 64  # the tiny teacher's embedding table has 64 rows past the tokenizer
FAST_RETRY = RetryPolicy(max_elapsed_s=2.0, initial_delay_s=0.01, max_delay_s=0.1)
TINY_RUN = dict(
    loss_path="logits",  # a payload teacher takes the logits path: compare like with like
    steps=3,
    prompts_per_step=4,
    rollouts_per_prompt=2,
    max_new_tokens=8,
    micro_batch_size=3,
    teacher_batch_size=5,
    eval_every=0,
    checkpoint_every=0,
    lr=1e-2,
    progress=False,
)
TIMING_KEYS = ("per_s", "seconds", "memory")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("tiny")), teacher_vocab_padding=PADDING)


@pytest.fixture(scope="module")
def teacher_model(tiny):
    return load_model(tiny["teacher"], CPU_FP32, False)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return load_tokenizer(tiny["teacher"])


@pytest.fixture(scope="module")
def scorer(teacher_model, tokenizer, tiny):
    return Scorer(teacher_model, tokenizer, tiny["teacher"])


@pytest.fixture
def make_server(scorer):
    """make_server(token=None, **limits) -> a started TeacherServer, closed at teardown."""
    servers = []

    def make(token=None, scorer_=None, **limits):
        server = TeacherServer(scorer_ or scorer, token=token, limits=ServerLimits(**limits))
        servers.append(server.start())
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def server(make_server):
    return make_server()


def _random_request(generator, vocab, k, count=3, requested=True):
    sequences, starts = [], []
    for _ in range(count):
        length = int(torch.randint(3, 20, (1,), generator=generator))
        sequences.append(torch.randint(0, vocab, (length,), generator=generator).numpy())
        starts.append(int(torch.randint(1, length + 1, (1,), generator=generator)))
    positions = sum(len(s) - start for s, start in zip(sequences, starts))
    requested_ids = (
        torch.randint(0, vocab, (positions, k), generator=generator).numpy() if requested else None
    )
    return sequences, starts, requested_ids


def _assert_matches_reference(result, model, sequences, starts, requested_ids, k, tau, limit):
    offset = 0
    for sequence, start in zip(sequences, starts):
        count = len(sequence) - start
        rows = slice(offset, offset + count)
        asked = None if requested_ids is None else requested_ids[rows]
        expected = reference_scores(model, sequence, start, k, tau, limit, asked)
        np.testing.assert_array_equal(result.topk_ids[rows], expected["topk_ids"])
        for name in ("topk_log_probs", "sampled_log_probs", "entropy", "requested_log_probs"):
            if name in expected:
                np.testing.assert_allclose(
                    getattr(result, name)[rows], expected[name], atol=1e-5, rtol=1e-5
                )
        offset += count
    assert offset == sum(result.positions)


# ---- wire format ---------------------------------------------------------------------------


def test_frame_roundtrip_and_alignment():
    arrays = {
        "a": np.arange(7, dtype=np.int32),
        "b": np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3),
        "c": np.array([math.pi]),
    }
    body = protocol.encode_frame({"hello": "world"}, arrays)
    header, decoded = protocol.decode_frame(body)
    assert header["hello"] == "world" and header["version"] == protocol.VERSION
    assert (8 + len(body[8 : 8 + int.from_bytes(body[4:8], "little")])) % 8 == 0
    for name, array in arrays.items():
        np.testing.assert_array_equal(decoded[name], array)
        assert decoded[name].dtype == array.dtype


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:5], "too short"),
        (lambda b: b"XXXX" + b[4:], "bad magic"),
        (lambda b: b[:4] + (10**6).to_bytes(4, "little") + b[8:], "header length"),
        (lambda b: b[:-1], "needs"),
        (lambda b: b + b"\0\0\0\0", "trailing"),
        (lambda b: b[:8] + b"x" + b[9:], "not JSON"),
    ],
)
def test_malformed_frames_raise(mutate, message):
    body = protocol.encode_frame({}, {"a": np.arange(4, dtype=np.int32)})
    with pytest.raises(protocol.ProtocolError, match=message):
        protocol.decode_frame(mutate(body))


def test_scored_spans_cover_real_tokens_through_the_last_scored_successor():
    attention = np.array([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    mask = np.zeros((3, 5), bool)
    mask[0, 2:4] = True  # left-padded row: tokens 1..5, scores 2..3, sends 1..4
    mask[1, 1:3] = True  # right-padded row: scores 1..2, sends 0..3
    assert scored_spans(attention, mask) == [ScoredSpan(0, 1, 5, 2), ScoredSpan(1, 0, 4, 1)]
    holes = attention.copy()
    holes[0, 3] = False
    with pytest.raises(ValueError, match="row 0's attention_mask is not one contiguous run"):
        scored_spans(holes, mask)
    mask[1, 3] = True  # scores position 3, whose successor 4 is padding
    with pytest.raises(ValueError, match=r"row 1 scores positions 1\.\.3 outside its tokens"):
        scored_spans(attention, mask)


def test_payload_bytes_per_token_under_one_percent_of_logits():
    """Issue target: k = 16, V = 151,936: the answer per response token (and the request's
    share too) is far under 1% of fp32 logits."""
    k, vocab, positions = 16, 151_936, 100
    arrays = {
        "topk_ids": np.zeros((positions, k), np.int32),
        "topk_log_probs": np.zeros((positions, k), np.float32),
        "requested_log_probs": np.zeros((positions, k), np.float32),
        "sampled_log_probs": np.zeros(positions, np.float32),
        "entropy": np.zeros(positions, np.float32),
    }
    answer = protocol.encode_score_response(k, vocab, [positions], arrays)
    request = protocol.encode_score_request(
        [np.zeros(positions + 1, np.int64)], [1], k, 1.0, vocab, np.zeros((positions, k))
    )
    logits_bytes = 4 * vocab
    assert len(answer) / positions <= 0.01 * logits_bytes
    assert (len(answer) + len(request)) / positions <= 0.01 * logits_bytes
    assert len(answer) / positions < 12 * k + 8 + 4  # 200 bytes + the amortised header


# ---- exact scoring -------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("vocab_limit", [None, "tokenizer"])
@pytest.mark.parametrize("requested", [True, False])
def test_server_scores_like_in_process(
    server, teacher_model, tokenizer, temperature, vocab_limit, requested
):
    limit = len(tokenizer) if vocab_limit == "tokenizer" else None
    generator = torch.Generator().manual_seed(0)
    k = 8
    sequences, starts, requested_ids = _random_request(
        generator, limit or len(tokenizer), k, count=4, requested=requested
    )
    client = TeacherClient(server.url)
    result = client.score(sequences, starts, k, temperature, limit, requested_ids)
    assert result.positions == [len(s) - start for s, start in zip(sequences, starts)]
    _assert_matches_reference(
        result, teacher_model, sequences, starts, requested_ids, k, temperature, limit
    )


def test_scoring_per_sequence_views_is_the_same(make_server, scorer, teacher_model, monkeypatch):
    """Large requests are scored on per-sequence views of the logits instead of a gathered
    copy (bounded memory); the answer is the same."""
    monkeypatch.setattr(scorer, "gather_bytes", 1)
    server = make_server()
    generator = torch.Generator().manual_seed(2)
    sequences, starts, requested_ids = _random_request(generator, 500, 4, count=3)
    result = TeacherClient(server.url).score(sequences, starts, 4, 1.0, 500, requested_ids)
    _assert_matches_reference(result, teacher_model, sequences, starts, requested_ids, 4, 1.0, 500)


def test_health_model_info_and_tokenizer_check(server, tokenizer, tmp_path):
    client = TeacherClient(server.url)
    assert client.health() == {"status": "ok"}
    info = client.model_info()
    assert info["vocab_size"] == len(tokenizer) + PADDING
    assert info["max_k"] == kernels.MAX_K and info["dtype"] == "float32"
    assert info["limits"]["max_seq_len"] == ServerLimits().max_seq_len
    teacher = RemoteTeacher(server.url)
    assert teacher.vocab_size == len(tokenizer) + PADDING
    teacher.check_tokenizer(tokenizer)
    other = _other_tokenizer()
    with pytest.raises(ValueError, match="different tokenizer than the student"):
        teacher.check_tokenizer(other)


def _other_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<bos>", "<eos>"] + [f"x{i}" for i in range(600)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def _padded_batch(generator, vocab, lengths, starts, total):
    batch = len(lengths)
    input_ids = torch.randint(0, vocab, (batch, total), generator=generator)
    attention = torch.zeros(batch, total, dtype=torch.long)
    response = torch.zeros(batch, total, dtype=torch.bool)
    for row, (length, start) in enumerate(zip(lengths, starts)):
        attention[row, :length] = 1
        response[row, start:length] = True
    position_ids = (attention.cumsum(1) - 1).clamp_min(0)
    return input_ids, attention, response, position_ids


@pytest.mark.parametrize("variant", [v for v in opd_fast.VARIANTS if v != "full_vocab"])
def test_remote_payload_gives_the_dense_loss(server, teacher_model, tokenizer, variant):
    """What the trainer does: dense loss on in-process teacher logits == sparse loss on the
    RemoteTeacher's payload (loss, gradient, every metric), for a right-padded batch where
    one sequence has no response at all."""
    vocab, k, tau = len(tokenizer), 8, 0.9
    generator = torch.Generator().manual_seed(1)
    lengths, starts, total = [14, 9, 5, 11], [4, 3, 5, 10], 14
    input_ids, attention, response, positions = _padded_batch(
        generator, vocab, lengths, starts, total
    )
    mask = response[:, 1:]
    student = torch.randn(4, total - 1, vocab, generator=generator) * 3
    teacher_logits = LocalTeacher(teacher_model, 2).logits(input_ids, attention, positions)
    dense_teacher = teacher_logits[:, :-1, :vocab]
    requested = kernels.row_topk(student.reshape(-1, vocab), k, tau).ids.reshape(4, total - 1, k)
    remote = RemoteTeacher(server.url, retry=FAST_RETRY)
    payload = remote.payload(input_ids, attention, mask, requested, k, tau, vocab)
    assert payload.topk_ids.shape == (4, total - 1, k) and payload.entropy.shape == (4, total - 1)
    settings = dict(
        k=k,
        variant=variant,
        estimator="pg",
        temperature=tau,
        mask=mask,
        sampled_ids=input_ids[:, 1:],
    )
    dense_student = student.clone().requires_grad_()
    dense = opd_fast.opd_loss(dense_student, dense_teacher, **settings)
    dense.loss.backward()
    sparse_student = student.clone().requires_grad_()
    sparse = opd_fast.opd_loss(sparse_student, payload, **settings)
    sparse.loss.backward()
    torch.testing.assert_close(sparse.loss, dense.loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sparse_student.grad, dense_student.grad, atol=1e-6, rtol=1e-5)
    for name, value in dense.metrics.items():
        torch.testing.assert_close(sparse.metrics[name], value, atol=1e-6, rtol=1e-5)


def test_remote_payload_splits_batches_to_the_server_limits(make_server, tokenizer):
    """A batch larger than the server takes per request is sent as several requests (their
    sizes within the advertised limits); the answer equals the one-request answer."""
    vocab, k = len(tokenizer), 4
    generator = torch.Generator().manual_seed(6)
    lengths, starts = [14, 9, 12, 11, 14, 3], [4, 3, 5, 10, 1, 1]
    input_ids, attention, response, _ = _padded_batch(generator, vocab, lengths, starts, 14)
    mask = response[:, 1:]
    requested = torch.randint(0, vocab, (6, 13, k), generator=generator)
    args = (input_ids, attention, mask, requested, k, 1.0, vocab)
    whole = RemoteTeacher(make_server().url).payload(*args)
    small = make_server(max_batch_sequences=2, max_batch_tokens=26, max_seq_len=14)
    split = RemoteTeacher(small.url).payload(*args)
    assert small.batcher.stats["requests"] >= 4
    for name in ("topk_ids", "topk_log_probs", "requested_log_probs", "sampled_log_probs"):
        torch.testing.assert_close(getattr(split, name)[mask], getattr(whole, name)[mask])
    torch.testing.assert_close(split.entropy[mask], whole.entropy[mask])


def _train_records(config_values, teacher=None):
    trainer = Trainer(make_config(config_values), teacher=teacher)
    trainer.run()
    rows = trainer.parts.log.read()
    return [
        {key: value for key, value in row.items() if not any(t in key for t in TIMING_KEYS)}
        for row in rows
        if row["kind"] == "train"
    ]


def _assert_same_training(got, want, skip=()):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for remote_row, local_row in zip(got, want):
        assert_close_records(remote_row, local_row, skip, where=f"step {local_row['step']}")


@pytest.mark.parametrize(
    ("variant", "estimator"), [("student_topk", "pg"), ("overlap_topk", "exact")]
)
def test_remote_training_reproduces_in_process(tmp_path, tiny, server, variant, estimator):
    """Issue item 3: training with the remote teacher gives the in-process run's metrics."""
    base = dict(**tiny, **TINY_RUN, variant=variant, estimator=estimator)
    local = _train_records(dict(base, run_dir=str(tmp_path / "local")))
    remote = _train_records(dict(base, run_dir=str(tmp_path / "remote"), teacher_url=server.url))
    _assert_same_training(remote, local)


def test_trainer_refuses_remote_full_vocab_and_other_tokenizer(tmp_path, tiny, server, make_server):
    base = dict(**tiny, **TINY_RUN, run_dir=str(tmp_path), teacher_url=server.url)
    with pytest.raises(ValueError, match="full_vocab"):
        Trainer(make_config(dict(base, variant="full_vocab")))
    other = _other_tokenizer()
    path = save_tiny_model(str(tmp_path / "other"), tokenizer=other, vocab_size=len(other))
    other_model = load_model(path, CPU_FP32, False)
    other_server = make_server(scorer_=Scorer(other_model, other, path))
    with pytest.raises(ValueError, match="different tokenizer"):
        Trainer(make_config(dict(base, teacher_url=other_server.url)))


# ---- security defaults, limits, malformed input ----------------------------------------------


def _raw(url, method, path, body=b"", headers=None):
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        answer = connection.getresponse()
        data = answer.read()
        return answer.status, dict(answer.getheaders()), data
    finally:
        connection.close()


def _valid_body(k=4, length=6):
    return protocol.encode_score_request(
        [np.arange(length)], [2], k, 1.0, None, np.zeros((length - 2, k), np.int64)
    )


def test_binds_loopback_by_default(server):
    assert server.httpd.server_address[0] == "127.0.0.1"
    from opd_fast.cli import build_parser

    args = build_parser().parse_args(["serve-teacher", "--model", "x"])
    assert args.host == "127.0.0.1"


def test_token_required(make_server, tokenizer):
    server = make_server(token="s3cret")
    headers = {"Content-Type": protocol.CONTENT_TYPE}
    for given in (None, "Bearer wrong", "Basic s3cret", "Bearer s3cret2"):
        sent = dict(headers, **({"Authorization": given} if given else {}))
        status, answer_headers, data = _raw(server.url, "POST", "/v1/score", _valid_body(), sent)
        assert status == 401 and "bearer token" in json.loads(data)["error"]
        assert answer_headers["WWW-Authenticate"].startswith("Bearer")
        assert _raw(server.url, "GET", "/v1/model-info", headers=sent)[0] == 401
    assert _raw(server.url, "GET", "/health")[0] == 200  # probes need no token
    good = dict(headers, Authorization="Bearer s3cret")
    assert _raw(server.url, "POST", "/v1/score", _valid_body(), good)[0] == 200
    started = time.monotonic()
    with pytest.raises(TeacherAuthError, match="401"):
        RemoteTeacher(server.url, token="wrong")  # permanent: no retries
    assert time.monotonic() - started < 1.0
    assert RemoteTeacher(server.url, token="s3cret").vocab_size == len(tokenizer) + PADDING


def _request(sequences, starts, k=4, requested="zeros", vocab_limit=None, temperature=1.0):
    positions = sum(len(s) - start for s, start in zip(sequences, starts))
    if isinstance(requested, str):
        requested = np.zeros((positions, k), np.int64)
    return protocol.encode_score_request(
        [np.asarray(s) for s in sequences], starts, k, temperature, vocab_limit, requested
    )


def _bad_requests(vocab_rows):
    limits = dict(max_seq_len=64, max_batch_sequences=4, max_batch_tokens=128)
    seq = list(range(10))
    prefix = b"OPDW" + (2).to_bytes(4, "little")
    return limits, [
        ("oversize body", b"\0" * 5000, 413, "exceeds the limit"),
        ("sequence too long", _request([list(range(65))], [1]), 422, "max_seq_len"),
        ("too many sequences", _request([seq] * 5, [1] * 5), 422, "at most 4"),
        (
            "too many tokens",
            _request([list(range(60))] * 3, [1] * 3, requested=None),
            422,
            "max_batch_tokens",
        ),
        ("token id out of range", _request([[0, vocab_rows]], [1]), 422, "token_ids must be"),
        ("negative token id", _request([[-1, 2, 3]], [1]), 422, "token_ids must be"),
        (
            "requested id out of range",
            _request([seq], [5], requested=np.full((5, 4), 10**6)),
            422,
            "requested_ids",
        ),
        ("k too large", _request([seq], [5], k=kernels.MAX_K + 1), 422, "k must be"),
        ("k zero", _request([seq], [5], k=0, requested=None), 422, "k must be"),
        ("temperature zero", _request([seq], [5], temperature=0.0), 422, "temperature"),
        ("temperature nan", _request([seq], [5], temperature=math.nan), 422, "temperature"),
        ("vocab_limit too big", _request([seq], [5], vocab_limit=10**7), 422, "vocab_limit"),
        ("response_start 0", _request([seq], [0]), 422, "response_start"),
        ("response_start past end", _request([seq], [11], requested=None), 422, "response_start"),
        ("no sequences", _request([], []), 422, "no sequences"),
        ("bad magic", b"HTTP" + b"\0" * 12, 400, "bad magic"),
        ("not JSON", prefix + b"{x", 400, "header is not JSON"),
        ("no version", prefix + b"{}", 400, "unsupported wire format version"),
        (
            "requested wrong shape",
            _request([seq], [5], requested=np.zeros((3, 4))),
            400,
            "requested_ids must be int32 of shape",
        ),
        (
            "unknown array",
            protocol.encode_frame(
                {
                    "k": 4,
                    "temperature": 1.0,
                    "vocab_limit": None,
                    "lengths": [3],
                    "response_starts": [1],
                },
                {"token_ids": np.zeros(3, np.int32), "extra": np.zeros(1, np.int32)},
            ),
            400,
            "unknown arrays",
        ),
        (
            "lengths not ints",
            protocol.encode_frame(
                {"k": 4, "temperature": 1.0, "lengths": ["3"], "response_starts": [1]},
                {"token_ids": np.zeros(3, np.int32)},
            ),
            400,
            "lengths must be",
        ),
    ]


def test_malformed_oversize_and_out_of_range_requests(make_server, scorer):
    limits, cases = _bad_requests(scorer.vocab_size)
    server = make_server(max_request_bytes=4096, **limits)
    headers = {"Content-Type": protocol.CONTENT_TYPE}
    for name, body, status, message in cases:
        got, _, data = _raw(server.url, "POST", "/v1/score", body, headers)
        answer = json.loads(data)
        assert (got, answer["status"]) == (status, status), (name, answer)
        assert message in answer["error"], (name, answer["error"])
    assert _raw(server.url, "POST", "/v1/nothing", b"x", headers)[0] == 404
    assert _raw(server.url, "GET", "/v1/score")[0] == 404
    assert _raw(server.url, "PUT", "/v1/score", b"x")[0] == 405
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.putrequest("POST", "/v1/score")
    connection.endheaders()
    assert connection.getresponse().status == 411
    connection.close()
    # garbage on the socket: the HTTP layer answers 400 and the server keeps serving
    for garbage, expected in (
        (b"\x16\x03\x01 not http at all\r\n\r\n", b'"status": 400'),
        (b"BREW /v1/score HTTP/1.1\r\n\r\n", b"HTTP/1.1 501"),
    ):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            raw.sendall(garbage)
            assert expected in raw.recv(1000)
    assert _raw(server.url, "POST", "/v1/score", _valid_body(), headers)[0] == 200
    client = TeacherClient(server.url, retry=FAST_RETRY)
    with pytest.raises(TeacherRequestError, match="422.*max_seq_len"):
        client.score([np.arange(100)], [1], 4)


# ---- client retries ------------------------------------------------------------------------


def test_unreachable_server_raises_after_bounded_retries():
    port = free_port()  # nothing listens there
    client = TeacherClient(
        f"http://127.0.0.1:{port}",
        retry=RetryPolicy(max_elapsed_s=0.6, initial_delay_s=0.05, max_delay_s=0.2),
    )
    started = time.monotonic()
    with pytest.raises(TeacherUnavailableError, match=r"failed \d+ time\(s\).*Connection"):
        client.health()
    assert 0.3 < time.monotonic() - started < 2.0


def test_connections_over_the_limit_get_503_and_are_retried(make_server):
    server = make_server(max_connections=1)
    holder = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:  # a connection takes a slot with its first request (kept alive), not when it opens
        holder.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert holder.recv(1024).startswith(b"HTTP/1.1 200")  # the held connection owns the slot
        status, headers, data = _raw(server.url, "GET", "/health")
        assert status == 503 and headers["Retry-After"] == "1"
        assert "too many connections" in json.loads(data)["error"]
        client = TeacherClient(server.url, retry=RetryPolicy(max_elapsed_s=5, max_delay_s=0.2))
        threading.Timer(0.5, holder.close).start()
        assert client.health() == {"status": "ok"}  # retried until the slot is free
    finally:
        holder.close()


def test_idle_keepalive_connection_is_reopened_quietly(make_server, monkeypatch, caplog):
    """The server drops idle keep-alive connections; the client's next request reconnects at
    once, without a retry warning or a backoff delay."""
    from opd_fast.serving import server as server_module

    monkeypatch.setattr(server_module._Handler, "timeout", 0.2)
    server = make_server()
    client = TeacherClient(server.url, retry=FAST_RETRY)
    assert client.health() == {"status": "ok"}
    time.sleep(0.6)
    with caplog.at_level(logging.WARNING, logger="opd_fast.teachers"):
        assert client.health() == {"status": "ok"}
    assert not caplog.records


def test_transient_errors_are_retried_permanent_ones_are_not():
    calls = {"info": 0, "score": 0}

    class Flaky(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _answer(self, status, value, headers=()):
            body = json.dumps(value).encode()
            self.send_response(status)
            for name, header in headers:
                self.send_header(name, header)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            calls["info"] += 1
            if calls["info"] == 1:
                self.close_connection = True  # drop the connection without an answer
                return None
            if calls["info"] <= 3:
                return self._answer(503, {"error": "busy"}, [("Retry-After", "0")])
            return self._answer(200, {"status": "ok"})

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            calls["score"] += 1
            return self._answer(422, {"error": "bad k", "status": 422})

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        client = TeacherClient(f"http://127.0.0.1:{httpd.server_address[1]}", retry=FAST_RETRY)
        assert client.health() == {"status": "ok"}
        assert calls["info"] == 4
        with pytest.raises(TeacherRequestError, match="422: bad k"):
            client.score([np.arange(4)], [1], 2)
        assert calls["score"] == 1
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_failing_request_does_not_poison_its_batch(make_server, scorer, teacher_model, monkeypatch):
    """Two requests merged into one forward; scoring one of them fails (500), the other is
    answered correctly, and the server keeps serving."""
    original = Scorer._payload

    def payload(self, job, logits, rows):
        if job.k == 3:
            raise RuntimeError("injected failure")
        return original(self, job, logits, rows)

    monkeypatch.setattr(Scorer, "_payload", payload)
    server = make_server(batch_wait_ms=300.0)
    client = TeacherClient(server.url, retry=RetryPolicy(max_elapsed_s=0, max_attempts=1))
    outcomes = {}

    def send(k):
        try:
            outcomes[k] = client.score([np.arange(9)], [3], k, 1.0, None, np.zeros((6, k)))
        except Exception as error:
            outcomes[k] = error

    threads = [threading.Thread(target=send, args=(k,)) for k in (3, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert server.batcher.stats["forwards"] == 1 and server.batcher.stats["requests"] == 2
    assert "injected failure" in str(outcomes[3])
    _assert_matches_reference(
        outcomes[5], teacher_model, [np.arange(9)], [3], np.zeros((6, 5), np.int64), 5, 1.0, None
    )


# ---- the OpenAI-compatible adapter -----------------------------------------------------------


@pytest.fixture(scope="module")
def exact_tiny(tmp_path_factory):
    """A teacher without padded rows: an engine's softmax then runs over the same ids."""
    return tiny_setup(str(tmp_path_factory.mktemp("exact")))


@pytest.fixture(scope="module")
def engine(exact_tiny):
    model = load_model(exact_tiny["teacher"], CPU_FP32, False)
    with FakeOpenAIServer(model, load_tokenizer(exact_tiny["teacher"]), api_key="key") as fake:
        yield fake


def _adapter(engine, variant="teacher_topk", **options):
    return OpenAITeacher(
        engine.url,
        "teacher",
        variant=variant,
        vocab_size=engine.model.get_output_embeddings().weight.shape[0],
        api_key="key",
        retry=FAST_RETRY,
        **options,
    )


@pytest.mark.parametrize("variant", ["student_topk", "nonoverlap_topk", "union_topk", "full_vocab"])
def test_openai_adapter_refuses_variants_it_cannot_make_exact(engine, variant):
    assert variant not in SUPPORTED_VARIANTS
    with pytest.raises(ValueError, match=f"cannot train variant '{variant}' exactly"):
        _adapter(engine, variant)


@pytest.mark.parametrize("mode", ["prompt_logprobs", "echo"])
def test_openai_adapter_payload_is_exact_where_defined(engine, mode):
    vocab, k = len(engine.tokenizer), 6
    generator = torch.Generator().manual_seed(3)
    lengths, starts, total = [12, 7, 10], [4, 2, 9], 12
    input_ids, attention, response, positions = _padded_batch(
        generator, vocab, lengths, starts, total
    )
    mask = response[:, 1:]
    student = torch.randn(3, total - 1, vocab, generator=generator)
    requested = kernels.row_topk(student.reshape(-1, vocab), k).ids.reshape(3, total - 1, k)
    adapter = _adapter(engine, mode=mode, top_logprobs=k + 4)
    payload = adapter.payload(input_ids, attention, mask, requested, k, 1.0, vocab)
    logits = LocalTeacher(engine.model, 8).logits(input_ids, attention, positions)[:, :-1]
    exact = payload_from_logits(
        logits.reshape(-1, vocab), requested.reshape(-1, k), k, 1.0, input_ids[:, 1:].reshape(-1)
    ).map(lambda t: t.reshape(3, total - 1, *t.shape[1:]))
    assert torch.equal(payload.topk_ids[mask], exact.topk_ids[mask])
    for name in ("topk_log_probs", "sampled_log_probs"):
        torch.testing.assert_close(
            getattr(payload, name)[mask], getattr(exact, name)[mask], atol=1e-5, rtol=0
        )
    assert torch.isnan(payload.entropy[mask]).all()
    known = ~torch.isnan(payload.requested_log_probs)
    torch.testing.assert_close(
        payload.requested_log_probs[known & mask[..., None]],
        exact.requested_log_probs[known & mask[..., None]],
        atol=1e-5,
        rtol=0,
    )
    # every student id inside the teacher's top-k is known (the overlap is exact)
    in_topk = (requested[..., :, None] == payload.topk_ids[..., None, :]).any(-1)
    assert known[in_topk & mask[..., None]].all()
    with pytest.raises(ValueError, match="temperature 1.0"):
        adapter.payload(input_ids, attention, mask, requested, k, 0.7, vocab)


def test_openai_adapter_nan_fields_never_silently_enter_a_loss(engine):
    """With the adapter's payload, the supported variants agree with the dense loss; the
    others raise (they would need log q at student ids outside the teacher's top-k)."""
    vocab, k = len(engine.tokenizer), 6
    generator = torch.Generator().manual_seed(4)
    input_ids, attention, response, positions = _padded_batch(generator, vocab, [10, 8], [3, 2], 10)
    mask = response[:, 1:]
    student = torch.randn(2, 9, vocab, generator=generator) * 2
    requested = kernels.row_topk(student.reshape(-1, vocab), k).ids.reshape(2, 9, k)
    payload = _adapter(engine).payload(input_ids, attention, mask, requested, k, 1.0, vocab)
    teacher = LocalTeacher(engine.model, 8).logits(input_ids, attention, positions)[:, :-1]
    for variant in opd_fast.VARIANTS:
        if variant == "full_vocab":
            continue
        settings = dict(k=k, variant=variant, mask=mask, sampled_ids=input_ids[:, 1:])
        if variant not in SUPPORTED_VARIANTS:
            with pytest.raises(opd_fast.NonFiniteLogitsError, match="needs teacher log-probs"):
                opd_fast.opd_loss(student, payload, **settings)
            continue
        sparse = opd_fast.opd_loss(student, payload, **settings)
        dense = opd_fast.opd_loss(student, teacher, **settings)
        torch.testing.assert_close(sparse.loss, dense.loss, atol=1e-5, rtol=1e-5)
        for name, value in dense.metrics.items():
            if name in ("entropy_teacher", "entropy_gap"):
                assert torch.isnan(sparse.metrics[name]), name
            else:
                torch.testing.assert_close(sparse.metrics[name], value, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("variant", "estimator", "mode"),
    [("teacher_topk", "pg", "prompt_logprobs"), ("overlap_topk", "exact", "echo")],
)
def test_openai_adapter_training_matches_in_process(
    tmp_path, exact_tiny, engine, variant, estimator, mode
):
    base = dict(**exact_tiny, **TINY_RUN, variant=variant, estimator=estimator)
    local = _train_records(dict(base, run_dir=str(tmp_path / "local")))
    adapter = _adapter(engine, variant, mode=mode)
    remote = _train_records(dict(base, run_dir=str(tmp_path / "engine")), teacher=adapter)
    unavailable = ("entropy_teacher", "entropy_gap")
    for row in remote:
        assert all(row[name] is None for name in unavailable)  # NaN -> null, not a guess
        for name in unavailable:
            if name in row.get("position_profile", {}):
                assert all(value is None for value in row["position_profile"][name])
    _assert_same_training(remote, local, skip=unavailable)


def test_openai_adapter_tokenizer_check_and_errors(engine, exact_tiny):
    adapter = _adapter(engine)
    adapter.check_tokenizer(tiny_tokenizer())
    with pytest.raises(ValueError, match="tokenizes differently"):
        adapter.check_tokenizer(_other_tokenizer())
    wrong_key = OpenAITeacher(
        engine.url, "teacher", variant="sampled_token", vocab_size=8, api_key="nope"
    )
    ids = torch.tensor([[1, 2, 3, 4]])
    args = (ids, torch.ones_like(ids), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(TeacherAuthError, match="invalid api key"):
        wrong_key.payload(*args, torch.zeros(1, 3, 2, dtype=torch.long), 2, 1.0, 8)
    wrong_model = OpenAITeacher(
        engine.url, "nope", variant="sampled_token", vocab_size=8, api_key="key"
    )
    with pytest.raises(TeacherRequestError, match="404: model not found"):
        wrong_model.payload(*args, torch.zeros(1, 3, 2, dtype=torch.long), 2, 1.0, 8)


def test_teacher_payload_nan_marks_are_checked():
    """A NaN at a requested id that *is* in the teacher's top-k is corruption, not a gap."""
    generator = torch.Generator().manual_seed(5)
    student, teacher = (
        torch.randn(6, 40, generator=generator),
        torch.randn(6, 40, generator=generator),
    )
    requested = kernels.row_topk(student, 4).ids
    payload = payload_from_logits(teacher, requested, 4)
    in_topk = (requested[:, :, None] == payload.topk_ids[:, None, :]).any(-1)
    assert in_topk.any()
    broken = TeacherPayload(
        **{
            **payload.__dict__,
            "requested_log_probs": payload.requested_log_probs.masked_fill(in_topk, math.nan),
        }
    )
    with pytest.raises(opd_fast.NonFiniteLogitsError, match="teacher payload: NaN"):
        opd_fast.opd_loss(student, broken, k=4, variant="teacher_topk")


# ---- hostile requests, an empty token, bursts (issue 13: the server answers every request) -----


def _frame(header_text: str, blobs: bytes = b"") -> bytes:
    """A frame with this literal JSON header (padded and prefixed as the format says)."""
    text = header_text.encode()
    text += b" " * (-(8 + len(text)) % 8)
    return b"OPDW" + len(text).to_bytes(4, "little") + text + blobs


def _header_only_frame(header: dict) -> bytes:
    return _frame(json.dumps({"version": protocol.VERSION, **header}))


@pytest.mark.parametrize("shape", [[2**70], [2**32, 2**32], [2**31, 2**31, 4]])
def test_huge_array_shapes_are_a_400_not_a_dropped_connection(make_server, shape):
    server = make_server()
    body = _header_only_frame(
        {
            "k": 2,
            "temperature": 1.0,
            "vocab_limit": None,
            "lengths": [3],
            "response_starts": [1],
            "arrays": [["token_ids", "int32", shape]],
        }
    )
    with pytest.raises(protocol.ProtocolError, match="more than"):
        protocol.decode_frame(body)
    headers = {"Content-Type": protocol.CONTENT_TYPE}
    status, _, data = _raw(server.url, "POST", "/v1/score", body, headers)
    assert status == 400 and "more than" in json.loads(data)["error"]
    assert _raw(server.url, "POST", "/v1/score", _valid_body(), headers)[0] == 200


def _score_at_temperature(server, temperature: str) -> tuple[int, bytes]:
    """(status, body) of a valid score request whose header says `temperature` (JSON text)."""
    valid = _valid_body()
    length = int.from_bytes(valid[4:8], "little")
    header = valid[8 : 8 + length].decode().strip()
    body = _frame(
        header.replace('"temperature": 1.0', f'"temperature": {temperature}'), valid[8 + length :]
    )
    headers = {"Content-Type": protocol.CONTENT_TYPE}
    status, _, data = _raw(server.url, "POST", "/v1/score", body, headers)
    return status, data


@pytest.mark.parametrize("temperature", ["1e400", "1" + "0" * 400, "-0.5"])
def test_unrepresentable_temperatures_are_a_422(make_server, temperature):
    status, data = _score_at_temperature(make_server(), temperature)
    assert status == 422 and "temperature must be positive and finite" in json.loads(data)["error"]


def test_an_empty_token_is_refused_not_served_without_auth(capsys, monkeypatch):
    from opd_fast.cli import main

    assert main(["serve-teacher", "--model", "/nonexistent", "--token", ""]) == 2
    assert "the token is empty" in capsys.readouterr().err
    monkeypatch.setenv("OPD_TEACHER_TOKEN", "")
    from opd_fast.cli import build_parser

    args = build_parser().parse_args(["serve-teacher", "--model", "/nonexistent"])
    with pytest.raises(ValueError, match="the token is empty"):
        args.handler(args)


def test_a_burst_of_64_simultaneous_connections_is_answered(make_server):
    server = make_server()
    assert server.httpd.request_queue_size >= 128
    barrier = threading.Barrier(64)
    answers = [None] * 64

    def connect(index):
        barrier.wait()
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as raw:
            raw.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answers[index] = raw.recv(64)

    threads = [threading.Thread(target=connect, args=(i,)) for i in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(answer and answer.startswith(b"HTTP/1.1 200") for answer in answers), answers


def test_a_tiny_temperature_gives_finite_log_probs(make_server, teacher_model, tokenizer):
    """tau = 1e-30 used to answer 200 with +inf / NaN log-probs: the teacher now shifts by the
    row max before scaling (finite log-probs of about -1e30) and matches the reference."""
    server = make_server()
    generator = torch.Generator().manual_seed(4)
    sequences, starts, requested_ids = _random_request(generator, len(tokenizer), 4, count=2)
    result = TeacherClient(server.url).score(sequences, starts, 4, 1e-30, None, requested_ids)
    for name in ("topk_log_probs", "requested_log_probs", "sampled_log_probs", "entropy"):
        assert np.isfinite(getattr(result, name)).all(), name
    assert (result.topk_log_probs <= 0).all()
    _assert_matches_reference(
        result, teacher_model, sequences, starts, requested_ids, 4, 1e-30, None
    )


@pytest.mark.parametrize("temperature", ["1e-300", "1e-39"])
def test_a_temperature_too_small_for_float32_is_a_422(make_server, temperature):
    status, data = _score_at_temperature(make_server(), temperature)
    assert status == 422 and "temperature" in json.loads(data)["error"]
    assert "too small" in json.loads(data)["error"]
