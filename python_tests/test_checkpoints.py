"""Checkpoints never lose a finished step and never trust a damaged file: kill -9 at every
stage of a save (a fault hook in save_checkpoint), damaged pointers, truncated and flipped
files, a torn metrics line; resume always continues from the newest intact checkpoint and
reproduces the uninterrupted run, or refuses with a message naming what is wrong."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from opd_fast.toy.tiny import tiny_setup
from opd_fast.training.checkpoints import folders as ckpt
from opd_fast.training.config import make_config
from opd_fast.training.metrics import MetricsLog
from opd_fast.training.trainer import Trainer

# Saves: step 1, 2, 3 (every step), then the end's re-save of step 3 (save number 4).
RUN = dict(
    steps=3,
    prompts_per_step=2,
    rollouts_per_prompt=2,
    max_new_tokens=6,
    micro_batch_size=4,
    teacher_batch_size=4,
    eval_every=0,
    checkpoint_every=1,
    lr=1e-2,
    progress=False,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("tiny")))


def _records(run_dir):
    """metrics.jsonl without the wall-clock fields."""
    timing = ("per_s", "seconds", "memory")
    rows = MetricsLog(os.path.join(run_dir, "metrics.jsonl")).read()
    return [{k: v for k, v in r.items() if not any(t in k for t in timing)} for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("full") / "run")
    Trainer(make_config(dict(**tiny, **RUN, run_dir=run_dir))).run()
    return _records(run_dir)


def _resume(tiny, run_dir):
    Trainer(make_config(dict(**tiny, **RUN, run_dir=run_dir))).run(resume=True)
    return _records(run_dir)


def _steps(run_dir):
    root = os.path.join(run_dir, "checkpoints")
    return sorted(name for name in os.listdir(root) if name.startswith("step_"))


# (save number, stage): every stage of a periodic save, and the re-save of a step (the run's
# end) between its writes, while the old copy is aside and after the new one is in place.
FAULTS = [(2, stage) for stage in ckpt.SAVE_STAGES if stage != "aside"] + [
    (4, stage) for stage in ("state", "manifest", "aside", "renamed")
]


@pytest.mark.parametrize(("save", "stage"), FAULTS)
def test_kill_at_any_save_stage_loses_no_finished_step(tmp_path, tiny, uninterrupted, save, stage):
    run_dir = str(tmp_path / "run")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(**tiny, **RUN, run_dir=run_dir)))
    env = dict(os.environ, **{ckpt.FAULT_ENV: f"{stage}:{save}"})
    killed = subprocess.run(
        [sys.executable, "-m", "opd_fast", "train", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert _resume(tiny, run_dir) == uninterrupted
    assert _steps(run_dir) == ["step_000001", "step_000002", "step_000003"]
    leftovers = [n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.startswith(".")]
    assert leftovers == []


def _stopped_run(tiny, run_dir, steps=2):
    Trainer(make_config(dict(**tiny, **RUN, run_dir=run_dir))).run(stop_after=steps)


def test_damaged_pointer_is_not_trusted(tmp_path, tiny, uninterrupted):
    run_dir = str(tmp_path / "run")
    _stopped_run(tiny, run_dir)
    with open(os.path.join(run_dir, "checkpoints", "latest"), "w") as handle:
        handle.write("\x00garbage")
    assert _resume(tiny, run_dir) == uninterrupted
    os.remove(os.path.join(run_dir, "checkpoints", "latest"))
    assert ckpt.latest_checkpoint(run_dir).endswith("step_000003")


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        ("truncate_weights", r"model/model\.safetensors has \d+ bytes, its manifest says"),
        ("flip_weights", r"model/model\.safetensors does not match its checksum"),
        ("flip_state", r"trainer_state\.safetensors does not match its checksum"),
        ("remove_state", r"trainer_state\.safetensors is missing"),
        ("garbage_manifest", r"manifest\.json is unreadable"),
    ],
)
def test_damaged_newest_checkpoint_falls_back_to_an_older_one(
    tmp_path, tiny, uninterrupted, damage, problem
):
    run_dir = str(tmp_path / "run")
    _stopped_run(tiny, run_dir)
    newest = os.path.join(run_dir, "checkpoints", "step_000002")
    weights = os.path.join(newest, "model", "model.safetensors")
    state = os.path.join(newest, ckpt.TRAINER_STATE)
    if damage == "truncate_weights":
        os.truncate(weights, os.path.getsize(weights) // 2)
    elif damage in ("flip_weights", "flip_state"):
        path = weights if damage == "flip_weights" else state
        with open(path, "r+b") as handle:
            handle.seek(os.path.getsize(path) - 64)
            byte = handle.read(1)
            handle.seek(-1, os.SEEK_CUR)
            handle.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "remove_state":
        os.remove(state)
    else:
        with open(os.path.join(newest, ckpt.MANIFEST), "w") as handle:
            handle.write("{not json")
    with pytest.warns(UserWarning, match=rf"step_000002: {problem}.*resuming from step_000001"):
        records = _resume(tiny, run_dir)
    assert records == uninterrupted


def test_history_without_a_usable_checkpoint_refuses_to_start_over(tmp_path, tiny):
    run_dir = str(tmp_path / "run")
    _stopped_run(tiny, run_dir)
    lines_before = len(MetricsLog(os.path.join(run_dir, "metrics.jsonl")).read())
    for name in _steps(run_dir):
        os.remove(os.path.join(run_dir, "checkpoints", name, ckpt.TRAINER_STATE))
    with pytest.raises(ckpt.CheckpointError, match="no intact checkpoint.*trainer_state"):
        _resume(tiny, run_dir)
    shutil.rmtree(os.path.join(run_dir, "checkpoints"))
    with pytest.raises(ckpt.CheckpointError, match="2 trained steps in metrics.jsonl but no"):
        _resume(tiny, run_dir)
    assert len(MetricsLog(os.path.join(run_dir, "metrics.jsonl")).read()) == lines_before


def test_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, tiny, uninterrupted):
    run_dir = str(tmp_path / "run")
    _stopped_run(tiny, run_dir)
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path, "a") as handle:
        handle.write('{"kind": "train", "step": 3, "loss": 0.')  # a kill mid-write
    with pytest.warns(UserWarning, match="line 4 was cut off mid-write; dropped"):
        assert _resume(tiny, run_dir) == uninterrupted


def test_a_damaged_metrics_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1, oops}\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not valid JSON"):
        MetricsLog(str(path)).read()
