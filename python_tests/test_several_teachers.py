"""Several teachers in one run (`teachers`): each prompt routed by its data row's `teacher`
field (or default_teacher), each micro-batch scored by its own teacher, the loss normalised
over the whole step, every metric also logged per teacher; bad names are errors before any
model loads; 2 gloo ranks give the single-process step."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from opd_fast.toy.tiny import tiny_setup
from opd_fast.training import builder
from opd_fast.training.config import make_config
from opd_fast.training.metrics import MetricsLog
from opd_fast.training.step.rollout import sample_rollouts
from opd_fast.training.trainer import Trainer, train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_distributed import (  # noqa: E402
    RUN,
    TIMING,
    _assert_records_close,
    _check,
    _torchrun,
    _write_config,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny models, and prompts whose rows alternate between teachers "other" and "self"."""
    folder = tmp_path_factory.mktemp("teachers")
    setup = tiny_setup(str(folder))
    routed = str(folder / "routed.jsonl")
    with open(setup["train_data"]) as source, open(routed, "w") as target:
        for index, line in enumerate(source):
            row = json.loads(line)
            row["teacher"] = "other" if index % 2 == 0 else "self"
            target.write(json.dumps(row) + "\n")
    return {**setup, "routed": routed}


def _keys(tiny, **more) -> dict:
    # "self" is the student itself: its overlap with the student is exactly 1, so a mixed-up
    # route shows in overlap_ratio/self.
    teachers = {"other": tiny["teacher"], "self": tiny["student"]}
    return {
        "student": tiny["student"],
        "teachers": teachers,
        "train_data": tiny["routed"],
        "eval_data": tiny["routed"],
        **RUN,
        **more,
    }


def test_each_teacher_scores_its_own_prompts_and_is_logged(tmp_path, tiny):
    run_dir = str(tmp_path / "run")
    train(make_config(_keys(tiny, run_dir=run_dir, steps=2, progress=False)))
    records = [r for r in MetricsLog(os.path.join(run_dir, "metrics.jsonl")).read()]
    steps = [r for r in records if r["kind"] == "train"]
    assert len(steps) == 2
    # Before the first update the student is its "self" teacher.
    assert steps[0]["overlap_ratio/self"] == pytest.approx(1.0)
    assert steps[0]["entropy_gap/self"] == pytest.approx(0.0, abs=1e-5)
    assert steps[0]["overlap_ratio/other"] < 0.99
    for record in steps:
        tokens = record["response_tokens/other"] + record["response_tokens/self"]
        assert tokens == record["response_tokens"]
        mixed = (
            record["overlap_ratio/other"] * record["response_tokens/other"]
            + record["overlap_ratio/self"] * record["response_tokens/self"]
        ) / tokens
        assert record["overlap_ratio"] == pytest.approx(mixed, rel=1e-6)
    assert summary_of(run_dir)["overlap_ratio/self_first"] == pytest.approx(1.0)
    evals = [r for r in records if r["kind"] == "eval"]
    first = evals[0]
    assert {"teacher_accuracy/other", "teacher_accuracy/self"} <= set(first)
    summary = summary_of(run_dir)
    assert "overlap_ratio/other_last" in summary and "teacher_accuracy/other" in summary


def summary_of(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as handle:
        return json.load(handle)


def test_a_step_of_several_teachers_is_the_sum_of_each_ones_share(tmp_path, tiny):
    """The mixed step's gradient equals, summed, the gradients of the same step's sequences
    scored with each teacher alone under the step's normalisation: with two identical teachers
    the routed run is the single-teacher run (up to the micro-batches' summation order)."""
    same = {"a": tiny["teacher"], "b": tiny["teacher"]}
    with open(tiny["routed"]) as handle:
        lines = handle.read().replace('"other"', '"a"').replace('"self"', '"b"')
    relabelled = tmp_path / "ab.jsonl"
    relabelled.write_text(lines)
    data = {"train_data": str(relabelled), "eval_data": str(relabelled)}
    routed = Trainer(make_config(_keys(tiny, run_dir=str(tmp_path / "r2"), teachers=same, **data)))
    single = Trainer(make_config({**tiny_single(tiny), "run_dir": str(tmp_path / "s")}))
    batch, examples = sample_rollouts(single.parts)
    single_record = single.train_step((batch, examples))
    routed_examples = [
        type(e)(e.prompt, e.answer, e.source, "a" if i % 3 else "b") for i, e in enumerate(examples)
    ]
    routed_record = routed.train_step((batch, routed_examples))
    for (name, want), got in zip(
        single.parts.student.named_parameters(), routed.parts.student.parameters()
    ):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert routed_record["loss"] == pytest.approx(single_record["loss"], rel=1e-5)
    assert routed_record["overlap_ratio"] == pytest.approx(single_record["overlap_ratio"])


def tiny_single(tiny) -> dict:
    return {
        "student": tiny["student"],
        "teacher": tiny["teacher"],
        "train_data": tiny["train_data"],
        "eval_data": tiny["train_data"],
        **RUN,
    }


def test_bad_names_are_errors_before_any_model_loads(tmp_path, tiny, monkeypatch):
    def no_models(*args, **kwargs):
        raise AssertionError("a model loaded before the data was checked")

    monkeypatch.setattr(builder, "load_pair", no_models)
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"prompt": "what ?", "answer": "1", "teacher": "cdoe"}) + "\n")
    config = make_config(_keys(tiny, run_dir=str(tmp_path / "u"), train_data=str(unknown)))
    with pytest.raises(ValueError, match=r"unknown\.jsonl:1: unknown teacher 'cdoe'.*other, self"):
        builder.build_run(config)
    unrouted = make_config(_keys(tiny, run_dir=str(tmp_path / "n"), train_data=tiny["train_data"]))
    with pytest.raises(ValueError, match="names no teacher .* no default_teacher"):
        builder.build_run(unrouted)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"teachers": {}}, "teachers is empty"),
        ({"teachers": {"a": "toy"}, "teacher": "x"}, "not both"),
        ({"teachers": {"a b": "toy"}}, "a name must be"),
        ({"teachers": {"a": 3}}, r"teachers\.a must be a model"),
        ({"teachers": {"a": {"path": "toy", "url": "http://h:1"}}}, "exactly one of path"),
        ({"teachers": {"a": {"pth": "toy"}}}, r"unknown key\(s\) \['pth'\]"),
        ({"teachers": {"a": {"url": "http://h:1", "api": "openai"}}}, "needs url and model"),
        ({"teachers": {"a": {"url": "ftp://h"}}}, r"teachers\.a\.url must be http"),
        ({"teachers": {"a": "/no/such/model"}}, r"teachers\.a path does not exist"),
        ({"teachers": {"a": "toy"}, "default_teacher": "b"}, "default_teacher 'b' is not one"),
        ({"default_teacher": "b"}, "default_teacher needs teachers"),
        ({"teachers": {"a": "toy"}, "cold_start_steps": 5}, "several teachers"),
        ({"teachers": "a"}, "teachers must be a mapping"),
    ],
)
def test_config_errors_name_the_key(values, message):
    with pytest.raises(ValueError, match=message):
        make_config(values)


def test_teachers_from_the_command_line():
    config = make_config({"teachers": "{math: toy, code: toy}", "default_teacher": "math"})
    assert config.teachers == {"math": "toy", "code": "toy"}


def test_one_teacher_runs_exactly_as_before(tmp_path, tiny):
    """A single `teacher` logs no per-teacher keys (records as before this feature)."""
    run_dir = str(tmp_path / "one")
    train(make_config({**tiny_single(tiny), "run_dir": run_dir, "steps": 1, "progress": False}))
    records = MetricsLog(os.path.join(run_dir, "metrics.jsonl")).read()
    assert not any("/" in key for record in records for key in record)


def test_two_rank_step_with_several_teachers_equals_single_process(tmp_path, tiny):
    values = _keys(tiny, run_dir=str(tmp_path / "single"))
    single = Trainer(make_config(values))
    batch, examples = sample_rollouts(single.parts)
    batch_path = str(tmp_path / "batch.pt")
    torch.save((batch, examples), batch_path)
    expected_record = single.train_step((batch, examples))
    config = _write_config(tmp_path / "c.json", {**values, "run_dir": str(tmp_path / "two")})
    out = str(tmp_path / "two.pt")
    _check(_torchrun(["step", config, "--batch", batch_path, "--out", out]))
    result = torch.load(out, weights_only=False)
    for name, value in single.parts.student.named_parameters():
        torch.testing.assert_close(result["gradients"][name], value.grad, rtol=1e-4, atol=1e-7)
    record = {k: v for k, v in result["record"].items() if not any(t in k for t in TIMING)}
    want = {k: v for k, v in expected_record.items() if not any(t in k for t in TIMING)}
    # Each rank holds one teacher's prompts here, so each runs the other's micro-batches empty
    # (FSDP's collectives): that padding is computed, and counted, on 2 ranks only.
    assert record.pop("computed_tokens_per_real_token") > want.pop("computed_tokens_per_real_token")
    _assert_records_close([record], [want])
    assert record["overlap_ratio/self"] == pytest.approx(1.0)
