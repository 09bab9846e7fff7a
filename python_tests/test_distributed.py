"""Multi-rank training on CPU ranks (gloo, torchrun, FSDP2): one 2-rank step is the
single-process step on the same global batch; a 2-rank run writes its folder from rank 0 alone,
resumes exactly and exports a model transformers loads with the trained student's logits; a
failing rank ends the launch naming it; metrics reduce as token-weighted means."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from opd_fast.op.names import TOKEN_METRIC_NAMES
from opd_fast.toy.tiny import tiny_setup
from opd_fast.training import distributed
from opd_fast.training.config import make_config
from opd_fast.training.loggers import open_run_log, parse_loggers
from opd_fast.training.metrics import MetricsLog, PositionProfile, StepMetrics
from opd_fast.training.step.rollout import sample_rollouts
from opd_fast.training.trainer import Trainer

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "distributed_worker.py")
REPO = os.path.dirname(HERE)

RUN = dict(
    steps=3,
    prompts_per_step=4,
    rollouts_per_prompt=2,
    max_new_tokens=6,
    micro_batch_size=2,
    teacher_batch_size=4,
    eval_every=0,
    eval_max_prompts=5,  # odd: ranks evaluate a padded split
    checkpoint_every=1,
    lr=1e-2,
    progress=False,
)
TIMING = ("per_s", "seconds", "memory")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("tiny")))


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        WORKER,
        *args,
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=REPO
    )


def _check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def _write_config(path, values: dict) -> str:
    with open(path, "w") as handle:
        json.dump(values, handle)
    return str(path)


def _records(run_dir):
    rows = MetricsLog(os.path.join(run_dir, "metrics.jsonl")).read()
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows]


def _assert_records_close(actual, expected, rtol=1e-5, atol=1e-6):
    assert [r["kind"] for r in actual] == [r["kind"] for r in expected]
    for got, want in zip(actual, expected):
        assert set(got) == set(want), set(got) ^ set(want)
        for key, value in want.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=rtol, abs=atol), key
            elif key != "position_profile":
                assert got[key] == value, key


# ---- no process group -------------------------------------------------------------------


def test_single_process_helpers_are_identities():
    single = distributed.Distributed.single()
    assert single.split(list(range(6))) == list(range(6))
    assert single.padded_share([1, 2, 3]) == ([1, 2, 3], 3)
    assert single.sum([3, 2.5]) == [3, 2.5]
    assert single.any(False) is False
    assert single.device_name("auto") == "auto"


def test_split_refuses_an_uneven_share_naming_the_key():
    two = distributed.Distributed(rank=1, world_size=2)
    assert two.split([0, 1, 2, 3]) == [2, 3]
    with pytest.raises(ValueError, match="prompts_per_step \\(3\\) must be a multiple"):
        two.split([0, 1, 2])


def test_teacher_urls_spread_over_ranks():
    urls = "http://a:1, http://b:2"
    assert [distributed.teacher_url_for_rank(urls, r) for r in range(3)] == [
        "http://a:1",
        "http://b:2",
        "http://a:1",
    ]
    assert distributed.teacher_url_for_rank("http://a:1", 5) == "http://a:1"
    with pytest.raises(ValueError, match="lists no server"):
        distributed.teacher_url_for_rank(" , ", 0)


def test_launcher_runs_the_same_command_under_torchrun():
    from opd_fast.cli import build_parser
    from opd_fast.cli.train import _relaunch

    argv = ["train", "--config", "c.yaml", "--nproc-per-node", "2", "--set", "k=4"]
    args = build_parser().parse_args(argv)
    args.argv = argv
    launched = []
    original = distributed.launch
    distributed.launch = lambda n, rest: launched.append((n, rest)) or 0
    try:
        assert _relaunch(args) == 0
    finally:
        distributed.launch = original
    assert launched == [(2, ["train", "--config", "c.yaml", "--set", "k=4"])]
    command = distributed.torchrun_command(2, ["train"])
    assert command[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "opd_fast",
        "train",
    ]
    with pytest.raises(ValueError, match="nproc-per-node must be >= 1"):
        distributed.torchrun_command(0, [])


def test_loggers_key_is_validated_and_a_missing_package_is_named(tmp_path):
    assert parse_loggers("tensorboard, wandb") == ["tensorboard", "wandb"]
    assert parse_loggers(["tensorboard"]) == ["tensorboard"]
    with pytest.raises(ValueError, match="unknown \\['mlflow'\\]"):
        make_config({"loggers": "mlflow"})
    log = open_run_log(str(tmp_path), "", {}, is_main=False)
    log.write({"kind": "train", "step": 1})
    assert not os.path.exists(log.path)
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs the tensorboard package"):
            open_run_log(str(tmp_path), "tensorboard", {})
        pytest.skip("tensorboard is not installed: only its clear error is tested")
    log = open_run_log(str(tmp_path), "tensorboard", {})
    log.write({"kind": "train", "step": 1, "loss": 0.5, "overlap_ratio": 0.25})
    log.close()
    assert any(name.startswith("events") for name in os.listdir(tmp_path / "tensorboard"))


# ---- a gloo group in this test's own processes --------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _metric_outputs(rank: int) -> list[dict]:
    """Two micro-batches' opd_loss metric means of `rank` (different token counts)."""
    generator = torch.Generator().manual_seed(rank)
    outputs = []
    for tokens in ((5.0, 11.0), (7.0, 2.0))[rank]:
        values = {name: float(torch.rand((), generator=generator)) for name in TOKEN_METRIC_NAMES}
        values.update(num_tokens=tokens, overlap_empty_rows=float(rank))
        outputs.append(values)
    return outputs


def _profile_inputs(rank: int):
    generator = torch.Generator().manual_seed(10 + rank)
    mask = torch.rand(3, 9, generator=generator) < 0.7
    return {"entropy_student": torch.rand(3, 9, generator=generator)}, mask


def _reduce_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    group = distributed.Distributed(rank=rank, world_size=2, active=True)
    metrics, profile = StepMetrics(), PositionProfile(span=9)
    for values in _metric_outputs(rank):
        metrics.add(values)
    profile.add(*_profile_inputs(rank))
    group.reduce_step_metrics(metrics, profile)
    shared = group.padded_share(list(range(5)))
    if rank == 0:
        torch.save({"means": metrics.means(), "profile": profile.means(), "share": shared}, out)
    dist.barrier()
    dist.destroy_process_group()


def test_step_metrics_reduce_to_token_weighted_means_over_ranks(tmp_path):
    out = str(tmp_path / "reduced.pt")
    torch.multiprocessing.spawn(_reduce_worker, args=(_free_port(), out), nprocs=2)
    reduced = torch.load(out)
    expected, profile = StepMetrics(), PositionProfile(span=9)
    for rank in (0, 1):
        for values in _metric_outputs(rank):
            expected.add(values)
        profile.add(*_profile_inputs(rank))
    assert reduced["means"].keys() == expected.means().keys()
    for name, value in expected.means().items():
        assert reduced["means"][name] == pytest.approx(value, rel=1e-12), name
    assert reduced["profile"].keys() == profile.means().keys()
    for name, chunks in profile.means().items():
        assert reduced["profile"][name] == pytest.approx(chunks, rel=1e-12), name
    assert reduced["share"] == ([0, 1, 2], 3)  # rank 0 of 5 items: 3 real; rank 1 pads


# ---- torchrun ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss_path", "ranked_keys"),
    [
        ("fused_linear", {}),
        ("logits", {}),
        ("fused_linear", {"teacher_sharding": "shard", "activation_checkpointing": True}),
        ("logits", {"micro_batch_tokens": 30, "pack_sequences": True}),
    ],
)
def test_two_rank_step_equals_single_process_step(tmp_path, tiny, loss_path, ranked_keys):
    """One step on 2 FSDP2 ranks equals the single-process step on the same global batch, on
    both loss paths (fused_linear: the output layer gathered by FSDP's hooks, its gradient
    reduce-scattered with the tied embeddings'), with the teacher replicated or sharded, with
    activation checkpointing, and with packed micro-batches."""
    values = dict(**tiny, **RUN, run_dir=str(tmp_path / "single"), loss_path=loss_path)
    single = Trainer(make_config(values))
    # One global batch of 8 sequences, given to both.
    batch, examples = sample_rollouts(single.parts)
    batch_path = str(tmp_path / "batch.pt")
    torch.save((batch, examples), batch_path)
    student = single.parts.student
    before = {name: p.detach().clone() for name, p in student.state_dict().items()}
    expected_record = single.train_step((batch, examples))
    expected = {name: p.detach().clone() for name, p in student.state_dict().items()}
    assert all(not torch.equal(before[name], expected[name]) for name in expected)

    ranked = {**values, "run_dir": str(tmp_path / "two"), **ranked_keys}
    config = _write_config(tmp_path / "c.json", ranked)
    out = str(tmp_path / "two.pt")
    _check(_torchrun(["step", config, "--batch", batch_path, "--out", out]))
    result = torch.load(out, weights_only=False)
    gradients = {name: p.grad for name, p in student.named_parameters()}
    assert result["gradients"].keys() == gradients.keys()
    for name, value in gradients.items():
        torch.testing.assert_close(result["gradients"][name], value, rtol=1e-4, atol=1e-7)
    assert result["parameters"].keys() == expected.keys()
    if not ranked_keys.get("pack_sequences"):
        # AdamW divides by sqrt(v): where a gradient is near zero, the two processes' different
        # summation orders move an update by a few 1e-6 (1 of 16,384 entries once). Packed
        # rows sum in yet another order: their gradients (above) are compared, not AdamW's
        # sign-like first update of near-zero ones.
        for name, value in expected.items():
            torch.testing.assert_close(result["parameters"][name], value, rtol=1e-5, atol=5e-6)
    record = {k: v for k, v in result["record"].items() if not any(t in k for t in TIMING)}
    want = {k: v for k, v in expected_record.items() if not any(t in k for t in TIMING)}
    _assert_records_close([record], [want])
    assert record["loss_path"] == loss_path
    profile = record["position_profile"]
    assert profile.keys() == want["position_profile"].keys()
    for name, chunks in want["position_profile"].items():
        assert [c is None for c in profile[name]] == [c is None for c in chunks], name
        present = [(a, b) for a, b in zip(profile[name], chunks) if b is not None]
        assert [a for a, _ in present] == pytest.approx(
            [b for _, b in present], rel=1e-5, abs=1e-6
        ), name


def test_rollout_unshard_gathers_once_per_phase(tmp_path, tiny):
    """rollout_unshard: on gathers each FSDP2 unit once for a rollout phase; off gathers every
    decoder layer at every decoding step (the root stays gathered after its first forward)."""
    counts = {}
    for mode in ("on", "off"):
        config = _write_config(
            tmp_path / f"{mode}.json",
            {**tiny, **RUN, "run_dir": str(tmp_path / mode), "rollout_unshard": mode},
        )
        out = str(tmp_path / f"{mode}.pt")
        _check(_torchrun(["generate", config, "--out", out]))
        counts[mode] = torch.load(out, weights_only=False)
    on, off = counts["on"], counts["off"]
    assert 0 < on["all_gathers"] <= on["units"]
    assert off["all_gathers"] >= (off["units"] - 1) * off["decoding_steps"] + 1


def test_sharded_teacher_answers_as_the_replicated_one(tmp_path, tiny):
    """teacher_sharding: shard holds half the teacher's parameters per rank (of 2) and gives
    the replicated teacher's hidden states, output layer and logits."""
    values = dict(**tiny, **RUN, run_dir=str(tmp_path / "single"))
    single = Trainer(make_config(values))
    batch, examples = sample_rollouts(single.parts)
    batch_path = str(tmp_path / "batch.pt")
    torch.save((batch, examples), batch_path)
    local = single.parts.teacher
    hidden = local.linear_teacher(
        batch.input_ids, batch.attention_mask, batch.position_ids, torch.float32
    )
    logits = local.logits(batch.input_ids, batch.attention_mask, batch.position_ids)
    ranked = {**values, "run_dir": str(tmp_path / "two"), "teacher_sharding": "shard"}
    out = str(tmp_path / "teacher.pt")
    _check(_torchrun(["teacher", _write_config(tmp_path / "c.json", ranked), "--batch",
                      batch_path, "--out", out]))  # fmt: skip
    sharded = torch.load(out, weights_only=False)
    assert sharded["held_fraction"] == pytest.approx(0.5, abs=0.01)
    torch.testing.assert_close(sharded["hidden"].hidden, hidden.hidden, rtol=1e-5, atol=1e-6)
    assert torch.equal(sharded["hidden"].weight, hidden.weight)
    torch.testing.assert_close(sharded["logits"], logits, rtol=1e-5, atol=1e-5)


def test_two_rank_run_resumes_exactly_and_exports(tmp_path, tiny):
    full_dir = str(tmp_path / "full")
    config = _write_config(tmp_path / "full.json", {**tiny, **RUN, "run_dir": full_dir})
    logits_path = str(tmp_path / "logits.pt")
    _check(_torchrun(["run", config, "--logits", logits_path]))

    # Rank 0 alone wrote the run folder: one copy of each record, the usual files.
    records = _records(full_dir)
    assert [r["kind"] for r in records] == ["eval", "train", "train", "train", "eval"]
    for name in ("metrics.jsonl", "summary.json", "dynamics.png", "config.json"):
        assert os.path.getsize(os.path.join(full_dir, name)) > 0
    final = os.path.join(full_dir, "checkpoints", "step_000003")
    assert sorted(os.listdir(final)) == [
        "dcp",
        "manifest.json",
        "metrics.jsonl",
        "model",
        "rank_00000.safetensors",
        "rank_00001.safetensors",
        "trainer_state.safetensors",
    ]

    # Stopped after 2 steps (a checkpoint), resumed through `opd-fast train --nproc-per-node 2`.
    part_dir = str(tmp_path / "part")
    part = _write_config(tmp_path / "part.json", {**tiny, **RUN, "run_dir": part_dir})
    _check(_torchrun(["run", part, "--stop-after", "2"]))
    assert [r["kind"] for r in _records(part_dir)] == ["eval", "train", "train"]
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "opd_fast",
            "train",
            "--nproc-per-node",
            "2",
            "--config",
            part,
            "--resume",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=_env(),
        cwd=REPO,
    )
    _check(resumed)
    assert "gap recovery" in resumed.stdout  # rank 0 printed the summary, once
    assert resumed.stdout.count("gap recovery") == 1
    _assert_records_close(_records(part_dir), records)

    # Export: a folder transformers loads, with the trained student's logits.
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "exported")
    exported = subprocess.run(
        [
            sys.executable,
            "-m",
            "opd_fast",
            "export",
            "--run",
            full_dir,
            "--step",
            "3",
            "--out",
            out,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        cwd=REPO,
    )
    _check(exported)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])).logits
    torch.testing.assert_close(logits, torch.load(logits_path), rtol=1e-5, atol=1e-5)

    # An earlier, sharded-only checkpoint is consolidated by export the same way.
    from opd_fast.training.checkpoints.export import export

    early = export(full_dir, 2, str(tmp_path / "step2"))
    assert AutoModelForCausalLM.from_pretrained(early, local_files_only=True) is not None


def test_a_failing_rank_ends_the_launch_naming_it(tmp_path, tiny):
    config = _write_config(tmp_path / "c.json", {**tiny, **RUN, "run_dir": str(tmp_path / "run")})
    started = time.perf_counter()
    result = _torchrun(["run", config, "--fail-rank", "1", "--fail-step", "2"], timeout=180)
    elapsed = time.perf_counter() - started
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "injected failure on rank 1" in output
    assert "rank      : 1" in output or "rank: 1" in output, output[-3000:]
    assert elapsed < 180
