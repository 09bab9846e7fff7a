"""The OPD training loop on tiny random Qwen3 / Llama models: end to end, exact resume,
fused op vs reference (Liger-style convergence), config and input validation."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from opd_fast.op import reference
from opd_fast.op.loss import OPDLossOutput
from opd_fast.op.reductions import mean_metrics
from opd_fast.toy.tiny import save_tiny_model, tiny_setup, tiny_tokenizer
from opd_fast.training.config import load_config, make_config
from opd_fast.training.step.rollout import sample_rollouts
from opd_fast.training.step.score import choose_loss_path, score_batch
from opd_fast.training.trainer import Trainer, TrainingDiverged, train

TINY_RUN = dict(
    steps=4,
    prompts_per_step=4,
    rollouts_per_prompt=2,
    max_new_tokens=8,
    micro_batch_size=3,
    teacher_batch_size=5,
    eval_every=2,
    checkpoint_every=2,
    lr=1e-2,
    progress=False,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("tiny")), teacher_vocab_padding=64)


def _records(run_dir):
    """metrics.jsonl without the wall-clock fields."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        rows = [json.loads(line) for line in handle]
    timing = ("per_s", "seconds", "memory")
    return [{k: v for k, v in r.items() if not any(t in k for t in timing)} for r in rows]


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_end_to_end_writes_run_folder(tmp_path, family):
    paths = tiny_setup(str(tmp_path / "models"), family=family)
    run_dir = str(tmp_path / "run")
    summary = train(dict(**paths, **TINY_RUN, run_dir=run_dir))
    for name in ("metrics.jsonl", "summary.json", "dynamics.png", "config.json"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0
    for key in (
        "student_acc_before",
        "student_acc_after",
        "teacher_acc",
        "gap_recovery",
        "overlap_ratio_first",
        "overlap_ratio_last",
        "wall_seconds",
    ):
        assert key in summary
    records = _records(run_dir)
    train_rows = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for name in reference.TOKEN_METRIC_NAMES + ("loss", "grad_norm", "lr"):
        assert all(r[name] is not None for r in train_rows), name
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        first = json.loads(handle.readlines()[1])
    for name in (
        "rollout_tokens_per_s",
        "teacher_tokens_per_s",
        "train_tokens_per_s",
        "peak_memory_mib",
        "rollout_peak_memory_mib",
        "train_peak_memory_mib",
    ):
        assert first[name] > 0
    assert first["loss_path"] == "fused_linear"
    assert os.path.exists(
        os.path.join(run_dir, "checkpoints", "step_000004", "model", "model.safetensors")
    )


def test_training_moves_the_student_towards_the_teacher(tmp_path, tiny):
    """After a few full-vocab OPD steps, KL(student || teacher) on fixed sequences drops."""
    run = dict(TINY_RUN, steps=6, lr=3e-3, variant="full_vocab", eval_every=0, checkpoint_every=0)
    trainer = Trainer(make_config(dict(**tiny, **run, run_dir=str(tmp_path / "run"))))
    fixed, _ = sample_rollouts(trainer.parts)

    def kl_on_fixed():
        with torch.no_grad():
            return _token_mean_loss(trainer, fixed)

    before = float(kl_on_fixed())
    trainer.run()
    assert float(kl_on_fixed()) < 0.8 * before


def _token_mean_loss(trainer, batch):
    """The token-mean loss of `batch` on the trainer's loss path (with its gradient)."""
    parts = trainer.parts
    scored = score_batch(parts.student, parts.teacher, batch, parts.loss, loss_path=parts.loss_path)
    return scored.output.loss / batch.num_response_tokens


def test_resume_reproduces_uninterrupted_run(tmp_path, tiny):
    base = dict(**tiny, **TINY_RUN)
    full_dir, resumed_dir = str(tmp_path / "full"), str(tmp_path / "resumed")
    Trainer(make_config(dict(base, run_dir=full_dir))).run()
    stopped = Trainer(make_config(dict(base, run_dir=resumed_dir))).run(stop_after=3)
    assert stopped["stopped_at_step"] == 3
    Trainer(make_config(dict(base, run_dir=resumed_dir))).run(resume=True)
    assert _records(full_dir) == _records(resumed_dir)


def _reference_loss(
    student_logits,
    teacher_logits,
    *,
    mask=None,
    sampled_ids=None,
    reduction="token_mean",
    return_token_metrics=False,
    **settings,
):
    """opd_fast.reference wrapped in opd_loss's signature and output."""
    loss, token_metrics, valid = reference.opd_loss(
        student_logits,
        teacher_logits,
        mask=mask,
        sampled_ids=sampled_ids,
        reduction=reduction,
        **settings,
    )
    names = reference.TOKEN_METRIC_NAMES
    rows = torch.stack([token_metrics[n] for n in names], dim=1)
    shape = student_logits.shape[:-1]
    per_token = {name: values.reshape(shape) for name, values in token_metrics.items()}
    return OPDLossOutput(
        loss=loss,
        metrics=mean_metrics(rows, valid, True),
        token_metrics=per_token if return_token_metrics else None,
    )


@pytest.mark.parametrize("variant", ["student_topk", "full_vocab", "sampled_token"])
def test_convergence_fused_matches_reference(tmp_path, tiny, variant):
    """Liger-style: a few training steps with the fused op and with the reference give the
    same losses and metrics within tolerance."""
    run = {
        **tiny,
        **TINY_RUN,
        "variant": variant,
        "eval_every": 0,
        "checkpoint_every": 0,
        "steps": 3,
    }
    fused_dir, reference_dir = str(tmp_path / "fused"), str(tmp_path / "reference")
    Trainer(make_config(dict(run, run_dir=fused_dir))).run()
    Trainer(make_config(dict(run, run_dir=reference_dir)), loss_fn=_reference_loss).run()
    fused = [r for r in _records(fused_dir) if r["kind"] == "train"]
    expected = [r for r in _records(reference_dir) if r["kind"] == "train"]
    for got, want in zip(fused, expected):
        for name in (
            "loss",
            "overlap_ratio",
            "entropy_student",
            "entropy_teacher",
            "overlap_mass_student",
            "sampled_token_kl",
            "grad_norm",
        ):
            assert got[name] == pytest.approx(want[name], rel=2e-3, abs=1e-5), name


def test_loss_paths_train_the_same_model(tmp_path, tiny):
    """fused_linear (hidden states, chunked) and logits (full logits) give the same run: every
    metric of every step, and the same evaluations (tiny Qwen3s with tied embeddings, the
    teacher's table padded by 64 rows)."""
    run = {**tiny, **TINY_RUN, "steps": 3, "eval_every": 0, "checkpoint_every": 0}
    runs = {}
    for path in ("fused_linear", "logits"):
        run_dir = str(tmp_path / path)
        Trainer(make_config(dict(run, run_dir=run_dir, loss_path=path))).run()
        runs[path] = _records(run_dir)
    assert [r.get("loss_path") for r in runs["fused_linear"] if r["kind"] == "train"] == [
        "fused_linear"
    ] * 3
    assert len(runs["fused_linear"]) == len(runs["logits"])
    for got, want in zip(runs["fused_linear"], runs["logits"]):
        assert got.keys() == want.keys()
        for name, value in want.items():
            if name == "loss_path":
                continue
            if isinstance(value, float):
                assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
            else:
                assert got[name] == value, name


def test_fused_linear_path_never_calls_an_output_layer(tmp_path, tiny):
    """On the fused path neither model's lm_head runs while scoring (no (B, T, V) logits);
    on the logits path both do."""
    for path, expected in (("fused_linear", 0), ("logits", 2)):
        config = make_config(dict(**tiny, **TINY_RUN, run_dir=str(tmp_path / path), loss_path=path))
        trainer = Trainer(config)
        batch, _ = sample_rollouts(trainer.parts)
        calls = []
        heads = [trainer.parts.student.get_output_embeddings()]
        heads.append(trainer.parts.teacher.local_model.get_output_embeddings())
        hooks = [
            h.register_forward_hook(lambda *a, h=h, calls=calls: calls.append(h)) for h in heads
        ]
        try:
            _token_mean_loss(trainer, batch).backward()
        finally:
            for hook in hooks:
                hook.remove()
        assert len({id(h) for h in calls}) == expected, path


def test_choose_loss_path_names_why_it_keeps_logits(tiny):
    """The fused path takes every teacher and any number of ranks; it gives way to logits for
    a custom loss_fn and for a student whose head is not linear, and says why."""
    from opd_fast.models.loading import Placement
    from opd_fast.training.pair import load_student

    student = load_student(tiny["student"], Placement.resolve("cpu"), trainable=False).student
    assert choose_loss_path("fused_linear", student)[0] == "fused_linear"
    path, why = choose_loss_path("fused_linear", student, loss_fn=_reference_loss)
    assert path == "logits" and "custom loss_fn" in why
    student.config.final_logit_softcapping = 30.0
    path, why = choose_loss_path("fused_linear", student)
    assert path == "logits" and "final_logit_softcapping=30.0" in why
    assert choose_loss_path("logits", student)[0] == "logits"
    with pytest.raises(ValueError, match="loss_path must be one of"):
        choose_loss_path("hidden", student)


def test_unknown_config_key_lists_valid_keys():
    with pytest.raises(ValueError, match="unknown key.*'learning_rate'.*valid keys: .*lr"):
        make_config({"learning_rate": 1.0})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"steps": 0}, "steps must be >= 1"),
        ({"variant": "topk"}, "config: unknown variant 'topk'; expected one of"),
        ({"k": 129}, r"config: k must be in \[1, 128\], got 129"),
        ({"teacher_api": "grpc"}, "teacher_api must be one of"),
        ({"teacher_api": "openai"}, "needs teacher_url and teacher_model"),
        ({"variant": "sampled_token", "estimator": "exact"}, "no form"),
        ({"rollout_top_p": 1.5}, "rollout_top_p"),
        ({"student": "/nonexistent/model"}, "student path does not exist"),
        ({"train_data": "/nonexistent.jsonl"}, "train_data path does not exist"),
        ({"lr_schedule": "step"}, "lr_schedule"),
        ({"loss_path": "hidden"}, "loss_path must be one of fused_linear, logits"),
    ],
)
def test_bad_config_values(values, message):
    with pytest.raises(ValueError, match=message):
        make_config(values)


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("k: 8\nlr: 1e-5\nvariant: overlap_topk\n")
    config = load_config(str(path), {"k": "4", "progress": "false"})
    assert (config.k, config.lr, config.variant, config.progress) == (
        4,
        1e-5,
        "overlap_topk",
        False,
    )
    with pytest.raises(ValueError, match="k must be an integer"):
        load_config(str(path), {"k": "four"})


def test_empty_dataset_is_an_error(tmp_path, tiny):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="dataset is empty"):
        train(dict(**{**tiny, "train_data": str(empty)}, **TINY_RUN, run_dir=str(tmp_path / "r")))


def test_k_larger_than_the_shared_vocabulary_is_an_error():
    # The pair loader's check once the shared vocabulary is known (the tiny models' 512 ids
    # exceed MAX_K, which the config checks before any model loads).
    from opd_fast.op.names import check_k

    with pytest.raises(ValueError, match=r"config: k must be in \[1, min\(V, 128\)\], got k=20"):
        check_k(20, 16, where="config: ")


def test_mismatched_tokenizers_are_an_error(tmp_path, tiny):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<bos>", "<eos>"] + [f"x{i}" for i in range(600)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    teacher = save_tiny_model(str(tmp_path / "other"), tokenizer=other, vocab_size=len(words))
    config = make_config(dict(**{**tiny, "teacher": teacher}, **TINY_RUN, run_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="tokenizers differ"):
        Trainer(config)


def test_padded_teacher_vocabulary_uses_shared_part(tmp_path, tiny):
    """The tiny teacher has 64 padded rows more than the student: training uses the shared
    columns (and so sees the tokenizer's full vocabulary)."""
    trainer = Trainer(make_config(dict(**tiny, **TINY_RUN, run_dir=str(tmp_path))))
    assert trainer.parts.pair.vocab == len(tiny_tokenizer())
    assert trainer.parts.teacher.vocab_size == trainer.parts.pair.vocab + 64


def test_shared_vocab_size_drops_padding_and_names_a_real_mismatch():
    from opd_fast.models.vocabulary import shared_vocab_size

    tokenizer = tiny_tokenizer()
    rows = len(tokenizer)
    assert shared_vocab_size(rows, rows + 128, tokenizer) == rows
    assert shared_vocab_size(rows + 64, rows + 128, tokenizer) == rows + 64
    with pytest.raises(ValueError, match=f"tokenizer has {rows} tokens.*student has {rows - 1}"):
        shared_vocab_size(rows - 1, rows + 128, tokenizer)


@pytest.mark.parametrize("loss_path", ["fused_linear", "logits"])
def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, tiny, loss_path):
    run_dir = str(tmp_path / "run")
    config = make_config(
        {**tiny, **TINY_RUN, "steps": 6, "run_dir": run_dir, "loss_path": loss_path}
    )
    trainer = Trainer(config)
    # What the teacher answers with on this path: logits, or hidden states.
    answer = "logits" if loss_path == "logits" else "linear_teacher"
    real_answer = getattr(trainer.parts.teacher, answer)
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        result = real_answer(*args)
        # Step 3 onwards (each step has 3 micro-batches): NaN teacher logits.
        if calls["n"] <= 6:
            return result
        if answer == "logits":
            return result * float("nan")
        return dataclasses.replace(result, hidden=result.hidden * float("nan"))

    setattr(trainer.parts.teacher, answer, poisoned)
    with pytest.raises(TrainingDiverged, match=r"step 3.*step_000002"):
        trainer.run()
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "step_000002"))


@pytest.mark.parametrize("max_staleness", [0, 1])
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path, tiny, max_staleness):
    """Ctrl-C finishes the step and saves (with rollouts sampled ahead, the queue too), the
    process ends without hanging, and a resume finishes the run."""
    run_dir = str(tmp_path / "run")
    config = {
        **tiny,
        **TINY_RUN,
        "steps": 400,
        "checkpoint_every": 0,
        "eval_every": 0,
        "run_dir": run_dir,
        "max_staleness": max_staleness,
    }
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    command = [sys.executable, "-m", "opd_fast.cli", "train", "--config", str(config_path)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(log) and len(open(log).readlines()) > 3):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=120)[0].decode()
    assert process.returncode == 130, output
    assert "checkpoint" in output
    saved_steps = [r["step"] for r in _records(run_dir) if r["kind"] == "train"]
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", f"step_{saved_steps[-1]:06d}"))
    resumed = subprocess.run(
        command + ["--resume", "--set", f"steps={saved_steps[-1] + 2}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    steps = [r["step"] for r in _records(run_dir) if r["kind"] == "train"]
    assert steps == list(range(1, saved_steps[-1] + 3))


def test_cli_reports_bad_config_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "opd_fast.cli", "train", "--set", "nonsense=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "unknown key" in result.stderr and "Traceback" not in result.stderr


def test_step_peak_memory_is_reset_between_stretches():
    """PeakMemory on CPU: a 256 MiB tensor made and freed in one stretch shows in its peak,
    not in the next stretch's; the run's peak keeps it."""
    from opd_fast.training import memory

    if not memory._reset_rss_peak():
        pytest.skip("this kernel does not let a process reset its RSS high-water mark")
    tracker = memory.PeakMemory(torch.device("cpu"))
    tracker.start()
    big = torch.ones(256 * 2**20 // 4)
    del big
    high = tracker.peak_mib()
    tracker.start()
    low = tracker.peak_mib()
    assert high - low > 200
    assert tracker.overall_mib == high


class _PayloadTeacher:
    """A payload teacher in process (what a teacher server answers, without the server): the
    in-process teacher's logits turned into a payload for the student's top-k ids."""

    needs_student_topk = True
    local_model = None

    def __init__(self, local):
        self.local, self.vocab_size, self.variants = local, local.vocab_size, local.variants
        self.requests = []

    def score(self, request):
        from opd_fast.op.payload import payload_from_logits

        self.requests.append(request)
        logits = self.local.logits(request.input_ids, request.attention_mask, request.position_ids)
        rows = logits[:, :-1, : request.vocab].float()
        batch, length, vocab = rows.shape
        payload = payload_from_logits(
            rows.reshape(-1, vocab),
            request.student_topk_ids.reshape(-1, request.k),
            request.k,
            request.temperature,
            request.input_ids[:, 1:].reshape(-1),
        )
        return payload.map(lambda t: t.reshape(batch, length, *t.shape[1:]))


@pytest.mark.parametrize("estimator", ["pg", "exact"])
def test_payload_teacher_on_both_loss_paths(tmp_path, tiny, estimator):
    """A payload teacher takes the fused path too: it is asked about the student's top-k ids
    (formed from hidden states, chunk by chunk, no lm_head call), and the loss, metrics and
    gradient equal the logits path's."""
    config = make_config(dict(**tiny, **TINY_RUN, run_dir=str(tmp_path), estimator=estimator))
    parts = Trainer(config).parts
    teacher = _PayloadTeacher(parts.teacher)
    batch, _ = sample_rollouts(parts)
    results = {}
    for path in ("logits", "fused_linear"):
        parts.student.zero_grad(set_to_none=True)
        calls = []
        head = parts.student.get_output_embeddings()
        hook = head.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        try:
            scored = score_batch(parts.student, teacher, batch, parts.loss, loss_path=path)
        finally:
            hook.remove()
        scored.output.loss.backward()
        grads = {n: p.grad.clone() for n, p in parts.student.named_parameters()}
        results[path] = (scored.output, grads, teacher.requests[-1].student_topk_ids, calls)
    logits, fused = results["logits"], results["fused_linear"]
    assert fused[3] == [] and logits[3] == [1]  # the fused path never runs the lm_head
    assert torch.equal(fused[2], logits[2])  # the same top-k ids asked about
    torch.testing.assert_close(fused[0].loss, logits[0].loss, rtol=1e-5, atol=1e-6)
    for name, value in logits[0].metrics.items():
        torch.testing.assert_close(fused[0].metrics[name], value, rtol=1e-5, atol=1e-6)
    for name, grad in logits[1].items():
        torch.testing.assert_close(fused[1][name], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_path", ["fused_linear", "logits"])
def test_activation_checkpointing_gives_the_same_step(tmp_path, tiny, loss_path):
    """activation_checkpointing recomputes each layer in the backward: the same loss, metrics,
    gradient norm and updated weights (on a fixed batch), on both loss paths."""
    run = {**tiny, **TINY_RUN, "loss_path": loss_path, "eval_every": 0, "checkpoint_every": 0}
    plain = Trainer(make_config(dict(run, run_dir=str(tmp_path / "plain"))))
    rollouts = sample_rollouts(plain.parts)
    expected = plain.train_step(rollouts)
    checkpointed = Trainer(
        make_config(dict(run, run_dir=str(tmp_path / "ac"), activation_checkpointing=True))
    )
    student = checkpointed.parts.student
    assert getattr(student, "is_activation_checkpointing", None) or (
        student.is_gradient_checkpointing
    )
    record = checkpointed.train_step(rollouts)
    for name in ("loss", "overlap_ratio", "entropy_student", "grad_norm"):
        assert record[name] == pytest.approx(expected[name], rel=1e-6, abs=1e-7), name
    for (name, got), want in zip(
        checkpointed.parts.student.state_dict().items(), plain.parts.student.state_dict().values()
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_activation_checkpointing_on_a_model_without_it_is_named(tmp_path, tiny):
    """A student whose architecture cannot checkpoint its layers is refused, naming why,
    before any weight loads."""
    student = tmp_path / "t5"
    student.mkdir()
    (student / "config.json").write_text(json.dumps({"model_type": "t5"}))
    config = make_config(
        dict(**{**tiny, "student": str(student)}, **TINY_RUN, run_dir=str(tmp_path / "run"),
             activation_checkpointing=True)
    )  # fmt: skip
    with pytest.raises(ValueError, match="activation_checkpointing is not possible: .*T5"):
        Trainer(config)
