"""Reliability of teacher serving on loopback, each test bounded in count and time:
32 concurrent clients x 1,000 requests (none lost, duplicated or mixed up: each answer checked
against in-process scoring); the server killed (SIGKILL) and restarted mid-training, training
going on without losing a step; bad and unauthorised requests interleaved with good ones."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
import torch
from serving_helpers import ServerProcess, assert_close_records, reference_scores

from opd_fast.models.loading import CPU_FP32, load_model, load_tokenizer
from opd_fast.serving.scorer import Scorer, ServerLimits
from opd_fast.serving.server import TeacherServer
from opd_fast.teachers.http import RetryPolicy, TeacherClient, TeacherRequestError
from opd_fast.toy.tiny import tiny_setup
from opd_fast.training.config import make_config
from opd_fast.training.trainer import Trainer
from opd_fast.wire import protocol

CLIENTS, REQUESTS = 32, 1000
TIMING_KEYS = ("per_s", "seconds", "memory")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("tiny")), teacher_vocab_padding=16)


@pytest.fixture(scope="module")
def teacher_model(tiny):
    return load_model(tiny["teacher"], CPU_FP32, False)


@pytest.fixture
def serve(teacher_model, tiny):
    servers = []

    def start(**options):
        limits = ServerLimits(**options.pop("limits", {}))
        scorer = Scorer(teacher_model, load_tokenizer(tiny["teacher"]), tiny["teacher"])
        servers.append(TeacherServer(scorer, limits=limits, **options).start())
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _requests(count, vocab, seed=0):
    """Distinct random requests: 1-3 sequences of 2-24 tokens, k in {1, 4, 16}, two
    temperatures, with and without requested ids."""
    rng = np.random.default_rng(seed)
    requests = []
    for index in range(count):
        k = int(rng.choice([1, 4, 16]))
        sequences, starts = [], []
        for _ in range(int(rng.integers(1, 4))):
            length = int(rng.integers(2, 25))
            sequences.append(rng.integers(0, vocab, length))
            starts.append(int(rng.integers(1, length + 1)))
        positions = sum(len(s) - start for s, start in zip(sequences, starts))
        requested = rng.integers(0, vocab, (positions, k)) if index % 3 else None
        temperature = 1.0 if index % 2 else 0.8
        requests.append((sequences, starts, k, temperature, requested))
    return requests


def _expected(model, request, vocab):
    sequences, starts, k, temperature, requested = request
    parts, offset = [], 0
    for sequence, start in zip(sequences, starts):
        count = len(sequence) - start
        asked = None if requested is None else requested[offset : offset + count]
        parts.append(reference_scores(model, sequence, start, k, temperature, vocab, asked))
        offset += count
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _check(result, expected, label):
    np.testing.assert_array_equal(result.topk_ids, expected["topk_ids"], err_msg=label)
    for name, value in expected.items():
        if name != "topk_ids":
            np.testing.assert_allclose(
                getattr(result, name), value, atol=1e-5, rtol=1e-5, err_msg=f"{label} {name}"
            )


def test_32_concurrent_clients_1000_requests(serve, teacher_model, tiny):
    vocab = len(load_tokenizer(tiny["teacher"]))
    server = serve(limits=dict(batch_wait_ms=2.0, max_batch_sequences=64))
    requests = _requests(REQUESTS, vocab)
    with torch.no_grad():
        expected = [_expected(teacher_model, request, vocab) for request in requests]
    answers: dict[int, object] = {}
    duplicates, errors = [], []
    lock = threading.Lock()
    work = iter(range(REQUESTS))
    retry = RetryPolicy(max_elapsed_s=30)

    def client_loop():
        client = TeacherClient(server.url, timeout=30, retry=retry)
        while True:
            with lock:
                index = next(work, None)
            if index is None:
                break
            sequences, starts, k, temperature, requested = requests[index]
            try:
                result = client.score(sequences, starts, k, temperature, vocab, requested)
            except Exception as error:  # recorded and reported below
                errors.append((index, repr(error)))
                continue
            with lock:
                if index in answers:
                    duplicates.append(index)
                answers[index] = result
        client.close()

    started = time.monotonic()
    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(1.0, 120 - (time.monotonic() - started)))
    assert not any(thread.is_alive() for thread in threads), "clients still running after 120 s"
    assert not errors, errors[:5]
    assert not duplicates
    assert sorted(answers) == list(range(REQUESTS)), "lost responses"
    for index, result in answers.items():
        sequences, starts = requests[index][:2]
        assert result.positions == [len(s) - start for s, start in zip(sequences, starts)]
        _check(result, expected[index], f"request {index}")
    stats = server.batcher.stats
    assert stats["requests"] == REQUESTS
    assert stats["forwards"] < REQUESTS  # concurrent requests were merged into batches


def _train_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        rows = [json.loads(line) for line in handle]
    return [
        {k: v for k, v in row.items() if not any(t in k for t in TIMING_KEYS)}
        for row in rows
        if row["kind"] == "train"
    ]


def test_server_killed_and_restarted_mid_training(tmp_path, tiny):
    """SIGKILL the teacher server during step 2 and start a new one on the same port: the
    client's retries bridge the gap, no step is lost, and the run equals an in-process one."""
    run = dict(
        loss_path="logits",  # a payload teacher takes the logits path: compare like with like
        **tiny,
        steps=4,
        prompts_per_step=4,
        rollouts_per_prompt=2,
        max_new_tokens=8,
        micro_batch_size=3,
        eval_every=0,
        checkpoint_every=0,
        lr=1e-2,
        progress=False,
    )
    Trainer(make_config(dict(run, run_dir=str(tmp_path / "local")))).run()
    with ServerProcess(tiny["teacher"]) as server:
        trainer = Trainer(
            make_config(dict(run, run_dir=str(tmp_path / "remote"), teacher_url=server.url))
        )
        real_payload = trainer.parts.teacher.payload
        events = {"calls": 0, "killed_at": None, "bridged_s": None}

        def payload(*args):
            events["calls"] += 1
            if events["calls"] == 4:  # the first micro-batch of step 2
                server.kill()
                events["killed_at"] = trainer.step + 1
                threading.Timer(0.5, lambda: server.start(wait=False)).start()
                started = time.monotonic()
                result = real_payload(*args)
                events["bridged_s"] = time.monotonic() - started
                return result
            return real_payload(*args)

        trainer.parts.teacher.payload = payload
        trainer.run()
    assert events["killed_at"] == 2 and events["bridged_s"] > 0.5
    remote, local = _train_rows(str(tmp_path / "remote")), _train_rows(str(tmp_path / "local"))
    assert [r["step"] for r in remote] == [1, 2, 3, 4]
    for got, want in zip(remote, local):
        assert_close_records(got, want, where=f"step {want['step']}")


def test_bad_requests_among_good_ones_under_concurrency(serve, teacher_model, tiny):
    """8 threads send valid, unauthorised, oversize, out-of-range and malformed requests at
    once: each bad one gets its 4xx, each good one its exact answer, and serving goes on."""
    vocab = len(load_tokenizer(tiny["teacher"]))
    server = serve(token="t0ken", limits=dict(max_request_bytes=8192, max_seq_len=32))
    good_requests = _requests(40, vocab, seed=1)
    with torch.no_grad():
        expected = [_expected(teacher_model, request, vocab) for request in good_requests]
    outcomes, lock = [], threading.Lock()
    retry = RetryPolicy(max_elapsed_s=10)

    def worker(offset):
        authorised = TeacherClient(server.url, token="t0ken", timeout=30, retry=retry)
        anonymous = TeacherClient(server.url, timeout=30, retry=retry)
        for index in range(offset, len(good_requests), 8):
            sequences, starts, k, temperature, requested = good_requests[index]
            cases = [
                ("good", authorised, (sequences, starts, k, temperature, vocab, requested)),
                ("no token", anonymous, (sequences, starts, k, temperature, vocab, requested)),
                ("too long", authorised, ([np.arange(40)], [1], 4)),
                (
                    "oversize",
                    authorised,
                    ([np.arange(30)] * 8, [1] * 8, 16, 1.0, None, np.zeros((232, 16))),
                ),
                ("out of range", authorised, ([np.array([0, 10**6])], [1], 4)),
            ]
            for name, client, args in cases:
                try:
                    result = client.score(*args)
                    status = 200
                except TeacherRequestError as error:
                    result, status = None, error.status
                with lock:
                    outcomes.append((name, index, status, result))
            body = b"OPDW" + b"\xff" * 12
            transport = authorised.transport
            try:
                transport.request("POST", "/v1/score", body, protocol.CONTENT_TYPE)
                status = 200
            except TeacherRequestError as error:
                status = error.status
            with lock:
                outcomes.append(("malformed", index, status, None))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    wanted = {
        "good": 200,
        "no token": 401,
        "too long": 422,
        "oversize": 413,
        "out of range": 422,
        "malformed": 400,
    }
    assert len(outcomes) == len(good_requests) * len(wanted)
    for name, index, status, result in outcomes:
        assert status == wanted[name], (name, index, status)
        if name == "good":
            _check(result, expected[index], f"request {index}")
    assert TeacherClient(server.url).health() == {"status": "ok"}
