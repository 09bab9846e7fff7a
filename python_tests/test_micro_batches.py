"""Micro-batches by sequences, by tokens and packed: the plans, and one training step that
gives the same loss, metrics and update whichever way the step's rollouts are split (on both
loss paths), with less padding."""

from __future__ import annotations

import pytest
import torch

from opd_fast.models.batch import packed_attention
from opd_fast.toy.tiny import tiny_setup
from opd_fast.training.config import make_config
from opd_fast.training.rollouts.batch import pack
from opd_fast.training.step.micro_batches import plan
from opd_fast.training.step.rollout import sample_rollouts
from opd_fast.training.trainer import Trainer

RUN = dict(
    steps=1,
    prompts_per_step=4,
    rollouts_per_prompt=3,
    max_new_tokens=24,
    micro_batch_size=3,
    teacher_batch_size=5,
    eval_every=0,
    checkpoint_every=0,
    lr=1e-2,
    progress=False,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("tiny")))


def test_plans():
    lengths = [10, 100, 12, 95, 11, 40]
    assert plan(lengths, 4) == [[[0], [1], [2], [3]], [[4], [5]]]
    by_tokens = plan(lengths, 4, micro_batch_tokens=200)
    assert by_tokens == [[[1], [3]], [[5], [2], [4], [0]]]  # longest first, padded <= 200
    for batch in by_tokens:
        assert len(batch) * max(lengths[row[0]] for row in batch) <= 200
    packed = plan(lengths, 4, micro_batch_tokens=120, pack=True)
    assert sorted(i for batch in packed for row in batch for i in row) == list(range(6))
    assert all(sum(lengths[i] for i in batch[0]) <= 120 for batch in packed)
    assert all(len(batch) == 1 for batch in packed)  # one packed row per micro-batch
    assert plan([300, 10], 4, micro_batch_tokens=100) == [[[0]], [[1]]]  # too long: alone


def test_packed_attention_is_block_causal():
    segments = torch.tensor([[1, 1, 2, 2, 2, 0]])

    class Model:
        class config:  # noqa: N801
            _attn_implementation = "sdpa"

    allowed = packed_attention(Model, torch.ones(1, 6), segments)[0, 0]
    assert allowed[3].tolist() == [False, False, True, True, False, False]
    assert allowed[1].tolist() == [True, True, False, False, False, False]
    assert allowed[5, 5]  # padding attends to itself: no empty softmax row
    assert packed_attention(Model, torch.ones(1, 6), None).shape == (1, 6)
    Model.config._attn_implementation = "flash_attention_2"
    assert packed_attention(Model, torch.ones(1, 6), segments) is None
    Model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="packed rows need sdpa, eager or flash_attention_2"):
        packed_attention(Model, torch.ones(1, 6), segments)


def spread(rollouts, tokenizer):
    """The sampled rollouts with their responses cut to lengths from 1 to all of them, long and
    short in turn (tiny random models never stop early): a batch whose lengths vary."""
    batch, examples = rollouts
    count = batch.input_ids.shape[0]
    sequences = []
    for row in range(count):
        prompt, response = batch.sequence(row)
        rank = row // 2 if row % 2 == 0 else count - 1 - row // 2
        keep = 1 + rank * (len(response) - 1) // max(count - 1, 1)
        log_probs = batch.engine_log_probs[row, len(prompt) : len(prompt) + keep].tolist()
        sequences.append((prompt, response[:keep], True, log_probs))
    return pack(sequences, tokenizer, batch.input_ids.device, batch.example_index), examples


SPLITS = [dict(micro_batch_tokens=90), dict(micro_batch_tokens=150, pack_sequences=True)]


@pytest.mark.parametrize("loss_path", ["fused_linear", "logits"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("split", SPLITS)
def test_a_step_is_the_same_however_it_is_split(tmp_path, tiny, loss_path, attention, split):
    run = {**tiny, **RUN, "loss_path": loss_path, "attn_implementation": attention}
    default = Trainer(make_config(dict(run, run_dir=str(tmp_path / "default"))))
    rollouts = spread(sample_rollouts(default.parts), default.parts.tokenizer)
    lengths = rollouts[0].lengths
    assert max(lengths) >= 2 * min(lengths)
    expected = default.train_step(rollouts)
    other = Trainer(make_config(dict(run, run_dir=str(tmp_path / "split"), **split)))
    record = other.train_step(rollouts)
    names = ("loss", "overlap_ratio", "overlap_token_advantage", "entropy_student",
             "entropy_teacher", "sampled_token_kl", "grad_norm", "response_tokens")  # fmt: skip
    for name in names:
        assert record[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
    for name, chunks in expected["position_profile"].items():
        got = record["position_profile"][name]
        assert [c is None for c in got] == [c is None for c in chunks], name
        pairs = [(a, b) for a, b in zip(got, chunks) if b is not None]
        assert [a for a, _ in pairs] == pytest.approx([b for _, b in pairs], rel=1e-5, abs=1e-6), (
            name
        )
    # The step's (clipped) gradients, still in .grad after the update. (AdamW's first update
    # is lr * sign(g): gradients at rounding level would flip it, so the weights are not
    # compared.)
    want = dict(default.parts.student.named_parameters())
    for name, parameter in other.parts.student.named_parameters():
        torch.testing.assert_close(parameter.grad, want[name].grad, rtol=1e-4, atol=1e-7, msg=name)
    assert record["computed_tokens_per_real_token"] < expected["computed_tokens_per_real_token"]
    if split.get("pack_sequences"):
        assert record["computed_tokens_per_real_token"] <= 1.15


def test_packing_keys_are_checked():
    with pytest.raises(ValueError, match="pack_sequences needs micro_batch_tokens"):
        make_config({"pack_sequences": True})
    with pytest.raises(ValueError, match="pack_sequences needs an in-process teacher"):
        make_config({"pack_sequences": True, "micro_batch_tokens": 64, "teacher_url": "http://x:1"})
    with pytest.raises(ValueError, match="micro_batch_tokens must be >= 0"):
        make_config({"micro_batch_tokens": -1})


def test_ranks_with_fewer_micro_batches_add_empty_ones(tmp_path, tiny):
    """Every rank runs as many forwards (FSDP's collectives): a rank whose plan is shorter
    than another's adds micro-batches with nothing to score."""
    from types import SimpleNamespace

    from opd_fast.training.step.micro_batches import micro_batches

    trainer = Trainer(make_config(dict(**tiny, **RUN, run_dir=str(tmp_path))))
    batch, _ = sample_rollouts(trainer.parts)
    config = SimpleNamespace(micro_batch_size=3, micro_batch_tokens=10_000, pack_sequences=True)

    class OtherRankHasFive:
        def max(self, values):
            return {name: max(value, 5) for name, value in values.items()}

    parts = list(micro_batches(batch, config, OtherRankHasFive()))
    assert len(parts) == 5
    assert int(parts[0].response_mask.sum()) == batch.num_response_tokens  # one packed row
    assert all(not bool(part.response_mask.any()) for part in parts[1:])
