"""The `vllm` rollout engine on several ranks (vLLM's CPU build, 2 gloo ranks): every rank's
colocated engine takes the full weights gathered from the FSDP2 shards, one layer at a time,
after every update. A 2-rank step equals the single-process step on the same global batch,
each rank's engine then serves the trained student's log-probs, and a resumed 2-rank run
reproduces the uninterrupted one.

Runs in vLLM's own environment (tools/vllm_env.sh); skips elsewhere.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip(
    "vllm", reason="vLLM is not installed here; tools/vllm_env.sh sets up its environment"
)

from test_distributed import (  # noqa: E402
    TIMING,
    _assert_records_close,
    _check,
    _records,
    _torchrun,
    _write_config,
)

from opd_fast.toy.tiny import save_tiny_model, tiny_tokenizer, write_prompts  # noqa: E402
from opd_fast.training.config import make_config  # noqa: E402
from opd_fast.training.step.rollout import sample_rollouts  # noqa: E402
from opd_fast.training.trainer import Trainer  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

RUN = dict(
    rollout_engine="vllm",
    steps=3,
    prompts_per_step=4,
    rollouts_per_prompt=2,
    max_new_tokens=6,
    micro_batch_size=2,
    teacher_batch_size=4,
    eval_every=0,
    eval_max_prompts=4,
    checkpoint_every=1,
    lr=1e-2,
    progress=False,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Head sizes vLLM's CPU attention runs (32, 64)."""
    folder = str(tmp_path_factory.mktemp("tiny"))
    tokenizer = tiny_tokenizer()
    student = save_tiny_model(f"{folder}/student", hidden_size=64, seed=1, tokenizer=tokenizer)
    teacher = save_tiny_model(f"{folder}/teacher", hidden_size=128, seed=2, tokenizer=tokenizer)
    prompts = write_prompts(f"{folder}/prompts.jsonl")
    return {"student": student, "teacher": teacher, "train_data": prompts, "eval_data": prompts}


def test_two_rank_vllm_step_equals_single_process_and_engines_follow(tmp_path, tiny):
    values = dict(**tiny, **RUN, run_dir=str(tmp_path / "single"))
    single = Trainer(make_config(values))
    try:
        batch, examples = sample_rollouts(single.parts)
        batch_path = str(tmp_path / "batch.pt")
        torch.save((batch, examples), batch_path)
        expected_record = single.train_step((batch, examples))
        gradients = {name: p.grad for name, p in single.parts.student.named_parameters()}
    finally:
        single.close()
    config = _write_config(tmp_path / "c.json", {**values, "run_dir": str(tmp_path / "two")})
    out = str(tmp_path / "two.pt")
    _check(_torchrun(["step", config, "--batch", batch_path, "--out", out], timeout=600))
    result = torch.load(out, weights_only=False)
    for name, value in gradients.items():
        torch.testing.assert_close(result["gradients"][name], value, rtol=1e-4, atol=1e-7)
    record = {k: v for k, v in result["record"].items() if not any(t in k for t in TIMING)}
    want = {k: v for k, v in expected_record.items() if not any(t in k for t in TIMING)}
    for key in ("loss", "overlap_ratio", "entropy_student", "grad_norm", "response_tokens"):
        assert record[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert record["weight_sync_bytes"] > 0
    # Every rank's engine took the updated weights from the shards: it serves what the
    # sharded student computes, to fp32 rounding.
    assert len(result["engine_gap"]) == 2
    assert max(result["engine_gap"]) < 1e-4, result["engine_gap"]


def test_two_rank_vllm_run_resumes_exactly(tmp_path, tiny):
    full = _write_config(tmp_path / "full.json", {**tiny, **RUN, "run_dir": str(tmp_path / "full")})
    _check(_torchrun(["run", full], timeout=900))
    resumed_dir = str(tmp_path / "resumed")
    resumed = _write_config(tmp_path / "resumed.json", {**tiny, **RUN, "run_dir": resumed_dir})
    _check(_torchrun(["run", resumed, "--stop-after", "2"], timeout=900))
    _check(_torchrun(["run", resumed, "--resume"], timeout=900))
    records = _records(str(tmp_path / "full"))
    assert [r["kind"] for r in records] == ["eval", "train", "train", "train", "eval"]
    _assert_records_close(_records(resumed_dir), records)


def test_vllm_beside_training_is_reproducible(tmp_path, tiny):
    """max_staleness: 1 with the vllm engine: rollouts sampled from a thread beside the
    trainer; two runs (each its own process) give the same records, the staleness bound
    holds and the gap of the stale rollouts is logged."""
    import subprocess
    import sys

    from test_distributed import _env

    runs = []
    for name in ("a", "b"):
        config = _write_config(
            tmp_path / f"{name}.json",
            {**tiny, **RUN, "run_dir": str(tmp_path / name), "max_staleness": 1,
             "checkpoint_every": 0},
        )  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-m", "opd_fast", "train", "--config", config],
            capture_output=True, text=True, timeout=600, env=_env(),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-4000:]
        runs.append(_records(str(tmp_path / name)))
    assert runs[0] == runs[1]
    train = [r for r in runs[0] if r["kind"] == "train"]
    assert [r["rollout_staleness"] for r in train] == [0, 1, 1]
