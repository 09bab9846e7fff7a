"""Helpers for the serving tests and benchmark: free loopback ports, a teacher server in a
subprocess (to kill and restart), in-process reference scoring, and a small fake
OpenAI-compatible completions server over a Hugging Face model (enough of vLLM's API for
OpenAITeacher: prompt_logprobs, echo + logprobs, /tokenize)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch

from opd_fast.op.payload import payload_from_logits


def assert_close_records(got, want, skip=(), rel=1e-4, abs_=1e-6, where="record") -> None:
    """Recursively compare metrics records (dicts, lists, numbers): floats to rel/abs
    tolerance, everything else exactly; keys in `skip` are ignored at any depth."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (where, sorted(got), sorted(want))
        for key, value in want.items():
            if key not in skip:
                assert_close_records(got[key], value, skip, rel, abs_, f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for index, (mine, theirs) in enumerate(zip(got, want)):
            assert_close_records(mine, theirs, skip, rel, abs_, f"{where}[{index}]")
    elif isinstance(want, float) and not isinstance(got, bool) and got is not None:
        assert abs(got - want) <= max(abs_, rel * abs(want)), (where, got, want)
    else:
        assert got == want, (where, got, want)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(url: str, timeout: float = 60.0, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"teacher server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"teacher server at {url} not healthy after {timeout} s")


class ServerProcess:
    """`opd-fast serve-teacher` in a subprocess on a fixed loopback port."""

    def __init__(self, model: str, port: int | None = None, args: list[str] | None = None):
        self.model = model
        self.port = port or free_port()
        self.args = list(args or [])
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, wait: bool = True, timeout: float = 90.0) -> ServerProcess:
        command = [sys.executable, "-m", "opd_fast.cli", "serve-teacher", "--model", self.model]
        command += ["--port", str(self.port), *self.args]
        environment = dict(os.environ, TRANSFORMERS_VERBOSITY="error")
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=environment
        )
        if wait:
            self.wait(timeout)
        return self

    def wait(self, timeout: float = 90.0) -> None:
        try:
            wait_healthy(self.url, timeout, self.process)
        except (RuntimeError, TimeoutError) as error:
            stderr = ""
            if self.process.poll() is not None:
                stderr = self.process.stderr.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"{error}\n{stderr}") from None

    def kill(self) -> None:
        """SIGKILL: the server dies mid-whatever, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@torch.no_grad()
def reference_scores(
    model,
    sequence: np.ndarray,
    response_start: int,
    k: int,
    temperature: float = 1.0,
    vocab_limit: int | None = None,
    requested_ids: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """In-process scoring of one sequence, as the server's arithmetic: forward, the logits at
    positions response_start-1 .. len-2 sliced to vocab_limit, payload_from_logits."""
    ids = torch.as_tensor(np.asarray(sequence), dtype=torch.long)[None]
    logits = model(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        position_ids=torch.arange(ids.shape[1])[None],
        use_cache=False,
    ).logits[0]
    vocab_limit = vocab_limit or logits.shape[-1]
    rows = logits[response_start - 1 : ids.shape[1] - 1, :vocab_limit]
    requested = (
        torch.empty((rows.shape[0], 0), dtype=torch.long)
        if requested_ids is None
        else torch.as_tensor(np.asarray(requested_ids), dtype=torch.long)
    )
    payload = payload_from_logits(rows, requested, k, temperature, ids[0, response_start:])
    result = {
        "topk_ids": payload.topk_ids.numpy(),
        "topk_log_probs": payload.topk_log_probs.numpy(),
        "sampled_log_probs": payload.sampled_log_probs.numpy(),
        "entropy": payload.entropy.numpy(),
    }
    if requested_ids is not None:
        result["requested_log_probs"] = payload.requested_log_probs.numpy()
    return result


# ---- a fake OpenAI-compatible engine -----------------------------------------------------


class FakeOpenAIServer:
    """/v1/completions (token-id prompts; vLLM's prompt_logprobs, or echo + logprobs with
    return_tokens_as_token_ids) and /tokenize over `model`, log-probs over all its rows."""

    def __init__(self, model, tokenizer, api_key: str | None = None):
        self.model, self.tokenizer, self.api_key = model, tokenizer, api_key
        self.requests = 0
        self.lock = threading.Lock()
        handler = type("Handler", (_FakeHandler,), {"engine": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.root = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.url = self.root + "/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeOpenAIServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @torch.no_grad()
    def complete(self, body: dict) -> dict:
        prompts = body["prompt"]
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        choices = []
        for index, prompt in enumerate(prompts):
            ids = torch.tensor(prompt)[None]
            with self.lock:
                logits = self.model(input_ids=ids, use_cache=False).logits[0].float()
            log_probs = torch.log_softmax(logits, dim=-1)
            choice = {"index": index, "text": "", "finish_reason": "length", "logprobs": None}
            tables = [None]
            for t in range(1, len(prompt)):
                row = log_probs[t - 1]
                count = int(body.get("prompt_logprobs") or body.get("logprobs") or 0)
                order = torch.sort(-row, stable=True).indices[:count].tolist()
                realised = prompt[t]
                entries = {i: float(row[i]) for i in order}
                entries[realised] = float(row[realised])
                tables.append(entries)
            if body.get("prompt_logprobs") is not None:
                choice["prompt_logprobs"] = [
                    None
                    if table is None
                    else {
                        str(i): {
                            "logprob": value,
                            "rank": int((log_probs[t - 1] > value).sum()) + 1,
                            "decoded_token": self.tokenizer.convert_ids_to_tokens(i),
                        }
                        for i, value in table.items()
                    }
                    for t, table in enumerate(tables)
                ]
            if body.get("echo"):
                as_ids = body.get("return_tokens_as_token_ids")

                def name(i, as_ids=as_ids):
                    return f"token_id:{i}" if as_ids else self.tokenizer.convert_ids_to_tokens(i)

                choice["logprobs"] = {
                    "tokens": [name(i) for i in prompt],
                    "token_logprobs": [None]
                    + [tables[t][prompt[t]] for t in range(1, len(prompt))],
                    "top_logprobs": [None]
                    + [{name(i): v for i, v in tables[t].items()} for t in range(1, len(prompt))],
                    "text_offset": list(range(len(prompt))),
                }
            choices.append(choice)
        return {"id": "cmpl-fake", "object": "text_completion", "choices": choices}


class _FakeHandler(BaseHTTPRequestHandler):
    engine: FakeOpenAIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _reply(self, status: int, value: dict):
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        engine = self.engine
        with engine.lock:
            engine.requests += 1
        if engine.api_key and self.headers.get("Authorization") != f"Bearer {engine.api_key}":
            return self._reply(401, {"error": {"message": "invalid api key", "code": 401}})
        if self.path == "/tokenize":
            ids = engine.tokenizer(
                body["prompt"], add_special_tokens=body.get("add_special_tokens", True)
            )["input_ids"]
            return self._reply(200, {"tokens": ids, "count": len(ids)})
        if self.path == "/v1/completions":
            if body.get("model") != "teacher":
                return self._reply(404, {"object": "error", "message": "model not found"})
            return self._reply(200, engine.complete(body))
        return self._reply(404, {"object": "error", "message": f"no route {self.path}"})
