"""The `vllm` rollout engine on vLLM's CPU build, for real (no fake engine): it samples the
tiny student with the trainer's settings and reports the log-probs the trainer computes, its
weights follow the trainer's after a step, a short run with `rollout_engine: vllm` completes
with the off-policy gap in metrics.jsonl, and an architecture vLLM does not know is refused
before an engine starts.

vLLM pins its own torch, so these tests run in their own environment: `tools/vllm_env.sh`
sets it up and runs them (the CI's vLLM stage). In the main environment they skip.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip(
    "vllm", reason="vLLM is not installed here; tools/vllm_env.sh sets up its environment"
)

from engine_helpers import forward_logits, reference_sampling_log_probs  # noqa: E402

from opd_fast.models.loading import Placement  # noqa: E402
from opd_fast.toy.tiny import save_tiny_model, tiny_tokenizer, write_prompts  # noqa: E402
from opd_fast.training.config import make_config  # noqa: E402
from opd_fast.training.off_policy import sampled_log_probs  # noqa: E402
from opd_fast.training.pair import load_student  # noqa: E402
from opd_fast.training.rollouts import EngineUnavailable, SamplingSettings, make_engine  # noqa: E402
from opd_fast.training.trainer import Trainer  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

PROMPTS = [[2, 10, 11], [2, 12], [2, 13, 14, 15, 16], [2, 10], [2, 17, 18], [2, 19, 20, 21]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Qwen3 student and a wider teacher with a padded vocabulary, with head sizes
    vLLM's CPU attention supports (32, 64)."""
    folder = str(tmp_path_factory.mktemp("tiny"))
    tokenizer = tiny_tokenizer()
    student = save_tiny_model(
        os.path.join(folder, "student"), hidden_size=64, seed=1, tokenizer=tokenizer
    )
    teacher = save_tiny_model(
        os.path.join(folder, "teacher"),
        hidden_size=128,
        vocab_size=len(tokenizer) + 64,
        seed=2,
        tokenizer=tokenizer,
    )
    prompts = write_prompts(os.path.join(folder, "prompts.jsonl"))
    return {"student": student, "teacher": teacher, "train_data": prompts, "eval_data": prompts}


@pytest.fixture(scope="module")
def student_engine(tiny):
    student = load_student(
        tiny["student"], Placement.resolve("cpu", "float32", "auto"), trainable=True
    )
    engine = make_engine(
        "vllm",
        student.student,
        student.tokenizer,
        model_path=tiny["student"],
        seed=0,
        max_model_len=64,
        max_num_seqs=32,
    )
    yield student, engine
    engine.close()


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_engine_samples_the_student(student_engine, temperature, top_p):
    """Responses stay inside the vocabulary limit, end at EOS or are flagged truncated, and
    the engine's log-probs are the reference's (the distribution sampled from, nucleus
    included) and, at top_p = 1, the trainer's: the off-policy gap is rounding (fp32)."""
    student, engine = student_engine
    vocab_limit = student.vocab - 7
    settings = SamplingSettings(
        eos_ids=tuple(student.eos_ids),
        max_new_tokens=10,
        temperature=temperature,
        top_p=top_p,
        vocab_limit=vocab_limit,
    )
    prompts = PROMPTS * 3
    batch = engine.generate(prompts, settings, seeds=list(range(len(prompts))))
    mask = batch.response_mask[:, 1:]
    ids = batch.input_ids[:, 1:][mask]
    assert int(ids.max()) < vocab_limit
    for row in range(len(prompts)):
        prompt, response = batch.sequence(row)
        assert prompt == prompts[row]
        ends = response[-1] in student.eos_ids
        assert batch.truncated[row] == (not ends)
        assert ends or len(response) == 10
    logits = forward_logits(student.student, batch)
    expected = reference_sampling_log_probs(logits[mask], ids, temperature, top_p, vocab_limit)
    actual = batch.engine_log_probs[:, 1:][mask].double()
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
    if top_p == 1.0:
        trainer = sampled_log_probs(logits[..., :vocab_limit], batch.input_ids[:, 1:], temperature)
        gap = (trainer[mask] - batch.engine_log_probs[:, 1:][mask]).abs()
        assert float(gap.mean()) < 1e-4, float(gap.mean())


def test_seeds_fix_the_samples(student_engine):
    student, engine = student_engine
    settings = SamplingSettings(eos_ids=tuple(student.eos_ids), max_new_tokens=10)
    prompts = [PROMPTS[0]] * 8
    first = engine.generate(prompts, settings, seeds=list(range(8)))
    again = engine.generate(prompts, settings, seeds=list(range(8)))
    other = engine.generate(prompts, settings, seeds=list(range(100, 108)))
    assert torch.equal(first.input_ids, again.input_ids)
    assert len({tuple(first.sequence(r)[1]) for r in range(8)}) > 1  # seeds differ per row
    assert not torch.equal(first.input_ids, other.input_ids)
    with pytest.raises(ValueError, match="2 seeds for 8 prompts"):
        engine.generate(prompts, settings, seeds=[1, 2])


def test_weights_synced_after_a_training_step(student_engine):
    """After an optimizer step the engine's log-probs of fixed sequences still equal the
    trainer's forward: before the sync they do not (so the comparison can fail)."""
    student, engine = student_engine
    model = student.student
    sequences = [ids + [30, 31, 32, 3] for ids in PROMPTS]

    def trainer_log_probs():
        out = []
        for ids in sequences:
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, :-1].float()
            out.append(logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0])
        return torch.cat(out)

    def engine_log_probs():
        return torch.tensor([x for row in engine.prompt_log_probs(sequences) for x in row])

    torch.testing.assert_close(engine_log_probs(), trainer_log_probs(), atol=1e-4, rtol=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    batch = torch.tensor([sequences[0]])
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    stale = (engine_log_probs() - trainer_log_probs()).abs().max()
    assert float(stale) > 1e-2, "the step did not move the weights enough to tell"
    engine.sync_weights(model)
    torch.testing.assert_close(engine_log_probs(), trainer_log_probs(), atol=1e-4, rtol=0)


def test_unsupported_architecture_is_refused(tmp_path, student_engine):
    student, _ = student_engine
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["NoSuchNetForCausalLM"]}))
    with pytest.raises(EngineUnavailable, match="NoSuchNetForCausalLM.*rollout_engine: hf"):
        make_engine("vllm", student.student, student.tokenizer, model_path=str(folder))


def test_unsupported_head_size_is_refused_at_start(tmp_path, student_engine):
    """A head size vLLM's CPU attention lacks (16) fails in the engine's constructor (its
    warm-up forward), naming the model and the way out, not at the first rollout."""
    student, _ = student_engine
    path = save_tiny_model(str(tmp_path / "narrow"), hidden_size=32)  # head_dim 16
    with pytest.raises(EngineUnavailable, match=r"cannot run the model at .*narrow.*hf"):
        make_engine("vllm", student.student, student.tokenizer, model_path=path, max_model_len=64)


def test_five_step_run_with_the_vllm_engine(tmp_path, tiny):
    """rollout_engine: vllm end to end (rollouts, evaluation, weight sync every step, a cold
    start whose teacher samples through its own vLLM engine): the run completes and every
    step reports an off-policy gap below 1e-3 (fp32). Runs last: closing the trainer's
    engines in this process ends vLLM's process-wide state."""
    run_dir = str(tmp_path / "run")
    config = make_config(
        dict(
            **tiny,
            run_dir=run_dir,
            rollout_engine="vllm",
            steps=5,
            prompts_per_step=4,
            rollouts_per_prompt=2,
            max_new_tokens=8,
            micro_batch_size=4,
            teacher_batch_size=8,
            eval_every=2,
            checkpoint_every=0,
            cold_start_steps=2,
            cold_start_batch_size=4,
            lr=1e-2,
            progress=False,
        )
    )
    trainer = Trainer(config)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    for record in train:
        assert record["rollout_logprob_gap_mean"] < 1e-3, record["rollout_logprob_gap_mean"]
        assert record["rollout_logprob_gap_max"] < 1e-2
    assert any(r["kind"] == "cold_start" for r in records)
    assert "student_acc_after" in summary
