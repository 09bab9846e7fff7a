"""The rollout-engine interface with the `hf` engine, the off-policy gap and its truncated
importance-sampling correction, in the main environment (no vLLM needed): engine log-probs
against a pure-PyTorch reference, the IS-weighted loss's value and gradient against the
reference op, the gap in metrics.jsonl, and the errors for a missing vLLM or a bad key.
The vLLM engine itself is tested in its own environment (test_vllm_engine.py)."""

from __future__ import annotations

import copy
import json
import os
import sys
import types

import pytest
import torch
from engine_helpers import forward_logits, reference_sampling_log_probs

from opd_fast.models.loading import Placement
from opd_fast.teachers.local import LocalTeacher
from opd_fast.toy.tiny import tiny_setup
from opd_fast.training.config import make_config
from opd_fast.training.off_policy import OffPolicyGap, sampled_log_probs, truncated_is_weights
from opd_fast.training.pair import load_student
from opd_fast.training.rollouts import EngineUnavailable, SamplingSettings, make_engine
from opd_fast.training.step.score import LossSettings, score_batch
from opd_fast.training.trainer import Trainer

RUN = dict(
    steps=2,
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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("tiny")), teacher_vocab_padding=64)


@pytest.fixture(scope="module")
def student(tiny):
    return load_student(
        tiny["student"], Placement.resolve("cpu", "float32", "auto"), trainable=False
    )


# ---- the hf engine ---------------------------------------------------------------------


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
def test_hf_engine_log_probs_match_reference(student, temperature, top_p):
    """Each sampled token's engine log-prob equals the reference's, computed from a fresh
    full forward of the packed sequences (the vocabulary limit cuts real columns)."""
    torch.manual_seed(0)
    engine = make_engine("hf", student.student, student.tokenizer, batch_size=3)
    vocab_limit = student.vocab - 7
    settings = SamplingSettings(
        eos_ids=tuple(student.eos_ids),
        max_new_tokens=9,
        temperature=temperature,
        top_p=top_p,
        vocab_limit=vocab_limit,
    )
    prompts = [[2, 10, 11], [2, 12], [2, 13, 14, 15, 16], [2, 10], [2, 17, 18]]
    batch = engine.generate(prompts, settings)
    assert batch.engine_log_probs is not None
    assert batch.engine_log_probs.shape == batch.input_ids.shape
    mask = batch.response_mask[:, 1:]
    ids = batch.input_ids[:, 1:][mask]
    assert int(ids.max()) < vocab_limit
    logits = forward_logits(student.student, batch)[mask]
    expected = reference_sampling_log_probs(logits, ids, temperature, top_p, vocab_limit)
    actual = batch.engine_log_probs[:, 1:][mask].double()
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=0)
    # Outside the responses the engine reports nothing.
    assert not batch.engine_log_probs[~batch.response_mask].any()
    # The trainer's side at top_p = 1 is the same number.
    if top_p == 1.0:
        trainer_side = sampled_log_probs(
            forward_logits(student.student, batch)[..., :vocab_limit],
            batch.input_ids[:, 1:],
            temperature,
        )[mask]
        torch.testing.assert_close(trainer_side.double(), expected, atol=2e-5, rtol=0)


def test_hf_engine_truncation_and_eos(student):
    torch.manual_seed(1)
    engine = make_engine("hf", student.student, student.tokenizer)
    settings = SamplingSettings(eos_ids=tuple(student.eos_ids), max_new_tokens=3)
    batch = engine.generate([[2, 10, 11]] * 6, settings)
    for row in range(6):
        _, response = batch.sequence(row)
        ends = response[-1] in student.eos_ids
        assert batch.truncated[row] == (not ends)
        assert len(response) == 3 or ends
        assert batch.engine_log_probs[row][batch.response_mask[row]].le(0).all()


def test_select_keeps_engine_log_probs(student):
    engine = make_engine("hf", student.student, student.tokenizer)
    settings = SamplingSettings(eos_ids=tuple(student.eos_ids), max_new_tokens=4)
    batch = engine.generate([[2, 10], [2, 11, 12, 13]], settings)
    part = batch.select(1, 2)
    assert part.engine_log_probs.shape == part.input_ids.shape
    torch.testing.assert_close(
        part.engine_log_probs[0], batch.engine_log_probs[1, : part.input_ids.shape[1]]
    )


# ---- off-policy helpers ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_sampled_log_probs_matches_log_softmax(dtype):
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 97, generator=generator) * 3).to(dtype)
    logits[0, 1, :50] = float("-inf")  # masked columns
    ids = torch.randint(50, 97, (3, 5), generator=generator)
    actual = sampled_log_probs(logits, ids, 0.6)
    expected = torch.log_softmax(logits.double() / 0.6, -1).gather(-1, ids[..., None])[..., 0]
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, atol=1e-5, rtol=1e-6)


def test_truncated_is_weights_and_gap():
    train = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -0.1, -9.0]])
    engine = torch.tensor([[-1.0, -1.0, -2.5], [-3.5, -0.1, -1.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    weights = truncated_is_weights(train, engine, cap=2.0)
    expected = torch.exp(train - engine).clamp(max=2.0)
    torch.testing.assert_close(weights, expected)
    assert float(weights.max()) == 2.0
    gap = OffPolicyGap()
    gap.add(train, engine, mask, weights, cap=2.0)
    means = gap.means()
    diffs = (train - engine).abs()[mask]
    assert means["rollout_logprob_gap_mean"] == pytest.approx(float(diffs.mean()))
    assert means["rollout_logprob_gap_max"] == pytest.approx(float(diffs.max()))
    assert means["rollout_is_weight_mean"] == pytest.approx(float(weights[mask].mean()))
    assert means["rollout_is_capped_fraction"] == pytest.approx(1 / 5)
    assert OffPolicyGap().means() == {}
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_is_weights(train, engine, cap=0.0)


@pytest.mark.parametrize("loss_path", ["logits", "fused_linear"])
def test_score_batch_applies_is_weights(student, tiny, loss_path):
    """With is_cap the loss is the per-token loss times min(ratio, cap), on both loss paths
    (the weights reach the loss as token weights); an engine log-prob shifted by log 2 at
    every token halves the weights."""
    torch.manual_seed(2)
    engine = make_engine("hf", student.student, student.tokenizer)
    settings = SamplingSettings(eos_ids=tuple(student.eos_ids), max_new_tokens=5)
    batch = engine.generate([[2, 10, 11], [2, 12, 13]], settings)
    batch.engine_log_probs = batch.engine_log_probs + torch.log(torch.tensor(2.0))
    other = copy.deepcopy(student.student)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    teacher = LocalTeacher(other, batch_size=4)
    loss_settings = LossSettings(
        k=4, variant="student_topk", estimator="pg", temperature=1.0, vocab=student.vocab
    )
    plain = score_batch(student.student, teacher, batch, loss_settings, loss_path=loss_path)
    weighted = score_batch(
        student.student,
        teacher,
        batch,
        loss_settings,
        rollout_temperature=1.0,
        is_cap=5.0,
        loss_path=loss_path,
    )
    mask = plain.response_mask
    torch.testing.assert_close(
        weighted.is_weights[mask],
        torch.full_like(weighted.is_weights[mask], 0.5),
        atol=1e-4,
        rtol=0,
    )
    assert float(weighted.output.loss) == pytest.approx(
        0.5 * float(plain.output.loss), rel=1e-3, abs=1e-7
    )
    gap = (weighted.train_log_probs - batch.engine_log_probs[:, 1:])[mask]
    torch.testing.assert_close(
        gap, torch.full_like(gap, -float(torch.log(torch.tensor(2.0)))), atol=1e-4, rtol=0
    )


# ---- the trainer -----------------------------------------------------------------------


def _train_records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [r for r in map(json.loads, handle) if r["kind"] == "train"]


@pytest.mark.parametrize("is_cap", [0.0, 2.0])
def test_trainer_logs_the_off_policy_gap(tmp_path, tiny, is_cap):
    """The hf engine samples the live model: the gap is rounding only, and the IS weights
    (when on) are ~1."""
    run_dir = str(tmp_path / "run")
    trainer = Trainer(make_config(dict(**tiny, **RUN, run_dir=run_dir, rollout_is_cap=is_cap)))
    trainer.run()
    records = _train_records(run_dir)
    assert len(records) == 2
    for record in records:
        assert 0 <= record["rollout_logprob_gap_mean"] <= record["rollout_logprob_gap_max"] < 1e-4
        assert record["weight_sync_seconds"] >= 0
        if is_cap:
            assert record["rollout_is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
            assert record["rollout_is_capped_fraction"] == 0.0
        else:
            assert "rollout_is_weight_mean" not in record


def test_bad_engine_keys_are_named():
    with pytest.raises(ValueError, match="rollout_engine must be one of"):
        make_config({"rollout_engine": "sglang"})
    with pytest.raises(ValueError, match="rollout_is_cap must be >= 0"):
        make_config({"rollout_is_cap": -1})


def test_vllm_missing_names_the_extra(tmp_path, tiny, monkeypatch):
    """Without vLLM, rollout_engine: vllm fails in the Trainer's constructor (before any
    step or evaluation), naming the extra that installs it."""
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    run_dir = str(tmp_path / "run")
    with pytest.raises(EngineUnavailable, match=r"opd_fast\[vllm\]"):
        Trainer(make_config(dict(**tiny, **RUN, run_dir=run_dir, rollout_engine="vllm")))
    assert not os.path.exists(os.path.join(run_dir, "metrics.jsonl"))


def test_unsupported_architecture_is_refused_before_starting(tmp_path, monkeypatch):
    """An architecture vLLM does not know is refused from config.json, before an engine
    starts (a stand-in vllm module: only its model registry is consulted)."""
    from opd_fast.training.rollouts.vllm import check_architecture

    registry = types.SimpleNamespace(get_supported_archs=lambda: {"Qwen3ForCausalLM": None}.keys())
    fake = types.SimpleNamespace(ModelRegistry=registry, __version__="0.32.0")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MyNetForCausalLM"]}))
    with pytest.raises(EngineUnavailable, match=r"MyNetForCausalLM.*rollout_engine: hf"):
        check_architecture(str(tmp_path), fake)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"]}))
    assert check_architecture(str(tmp_path), fake) == "Qwen3ForCausalLM"
    with pytest.raises(EngineUnavailable, match="cannot read"):
        check_architecture(str(tmp_path / "missing"), fake)
