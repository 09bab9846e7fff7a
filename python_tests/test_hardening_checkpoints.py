"""Checkpoints against a full disk, odd folders and hostile files (issue 23, items 1 and 2):
a save the file system refuses is a named error with the space it needs, the earlier
checkpoints intact (a real small tmpfs where this machine allows mounting one, an injected
ENOSPC everywhere); a manifest of any wrong shape, a step folder that is a link, a file or
another step's copy is passed over with a warning and replaced by the next save; a lost or cut
metrics.jsonl comes back from the checkpoint; a fresh run removes what killed saves left;
loading runs no code (a malicious pickle in a format-1 trainer state, a rank file or DCP's
metadata is refused and never runs), format-1 checkpoints still resume exactly, and a damaged
zip member under a resealed manifest is caught."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

from opd_fast.cli import main
from opd_fast.toy.tiny import tiny_setup
from opd_fast.training.checkpoints import folders as ckpt
from opd_fast.training.checkpoints import single as single_module
from opd_fast.training.config import make_config
from opd_fast.training.metrics import MetricsLog
from opd_fast.training.trainer import Trainer

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
TIMING = ("per_s", "seconds", "memory")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("tiny")))


def _records(run_dir):
    rows = MetricsLog(os.path.join(run_dir, "metrics.jsonl")).read()
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("full") / "run")
    Trainer(make_config(dict(**tiny, **RUN, run_dir=run_dir))).run()
    return _records(run_dir)


@pytest.fixture(scope="module")
def stopped_once(tiny, tmp_path_factory):
    """A run stopped after 2 steps (checkpoints step_000001, step_000002), copied per test."""
    run_dir = str(tmp_path_factory.mktemp("stopped") / "run")
    Trainer(make_config(dict(**tiny, **RUN, run_dir=run_dir))).run(stop_after=2)
    return run_dir


@pytest.fixture
def stopped(stopped_once, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(stopped_once, run_dir, symlinks=True)
    return run_dir


def _resume(tiny, run_dir):
    Trainer(make_config(dict(**tiny, **RUN, run_dir=run_dir))).run(resume=True)
    return _records(run_dir)


def _step(run_dir, step):
    return os.path.join(run_dir, "checkpoints", f"step_{step:06d}")


def _manifest(folder):
    with open(os.path.join(folder, ckpt.MANIFEST)) as handle:
        return json.load(handle)


def _write_manifest(folder, manifest):
    with open(os.path.join(folder, ckpt.MANIFEST), "w") as handle:
        handle.write(manifest if isinstance(manifest, str) else json.dumps(manifest))


def _steps(run_dir):
    root = os.path.join(run_dir, "checkpoints")
    return sorted(name for name in os.listdir(root) if not name.startswith("latest"))


# ---- the manifest, whatever its shape -----------------------------------------------------

STATE = ckpt.TRAINER_STATE
LEGACY = "trainer_state.pt"  # format 1's name


def _without(entry, key):
    return {k: v for k, v in entry.items() if k != key}


MANIFEST_DAMAGE = [
    (
        "files a list",
        lambda m: {**m, "files": list(m["files"])},
        r"has no files mapping \(got list\)",
    ),
    (
        "no bytes",
        lambda m: {**m, "files": {**m["files"], STATE: _without(m["files"][STATE], "bytes")}},
        rf"entry '{STATE}' has no byte count \(got None\)",
    ),
    (
        "bytes a string",
        lambda m: {**m, "files": {**m["files"], STATE: {**m["files"][STATE], "bytes": "12"}}},
        rf"entry '{STATE}' has no byte count \(got '12'\)",
    ),
    (
        "no sha256",
        lambda m: {**m, "files": {**m["files"], STATE: _without(m["files"][STATE], "sha256")}},
        rf"entry '{STATE}' has no sha256",
    ),
    (
        "entry a number",
        lambda m: {**m, "files": {**m["files"], STATE: 7}},
        rf"entry '{STATE}' is not an object \(got 7\)",
    ),
    ("a list", lambda m: [m], r"is not an object \(got list\)"),
    ("no step", lambda m: _without(m, "step"), r"has no integer step \(got None\)"),
    ("another step", lambda m: {**m, "step": 1}, r"is for step 1, not 2 \(the folder's name\)"),
    ("a newer format", lambda m: {**m, "format": 99}, r"has format 99; this opd_fast reads"),
    ("no trainer state", lambda m: {**m, "files": {}}, rf"lists no {STATE}"),
    (
        "a path outside",
        lambda m: {**m, "files": {**m["files"], "../../escape": m["files"][STATE]}},
        r"lists a path outside its folder: '\.\./\.\./escape'",
    ),
    ("nested 100,000 deep", lambda m: "[" * 100_000 + "]" * 100_000, r"is unreadable"),
]


@pytest.mark.parametrize(("damage", "problem"), [(d, p) for _, d, p in MANIFEST_DAMAGE],
                         ids=[name for name, _, _ in MANIFEST_DAMAGE])  # fmt: skip
def test_a_manifest_of_any_wrong_shape_is_passed_over_with_a_warning(stopped, damage, problem):
    newest = _step(stopped, 2)
    _write_manifest(newest, damage(_manifest(newest)))
    with pytest.warns(
        UserWarning, match=rf"step_000002: manifest\.json {problem}.*from step_000001"
    ):
        assert ckpt.find_checkpoint(stopped) == _step(stopped, 1)


def test_resume_after_a_malformed_manifest_reproduces_the_run(tiny, stopped, uninterrupted):
    newest = _step(stopped, 2)
    manifest = _manifest(newest)
    _write_manifest(newest, {**manifest, "files": list(manifest["files"])})
    with pytest.warns(UserWarning, match="step_000002: manifest.json has no files mapping"):
        assert _resume(tiny, stopped) == uninterrupted
    assert _steps(stopped) == ["step_000001", "step_000002", "step_000003"]
    assert ckpt.verify(_step(stopped, 2)) is None  # replaced by the resumed run's save


# ---- step folders that are links, files or another step's --------------------------------


@pytest.mark.parametrize("kind", ["link loop", "link to a checkpoint", "file", "another step"])
def test_an_odd_step_folder_is_passed_over_and_the_next_save_replaces_it(
    tiny, stopped, uninterrupted, tmp_path, kind
):
    third = _step(stopped, 3)
    outside = str(tmp_path / "elsewhere")
    if kind == "link loop":
        os.symlink("step_000003", third)
        problem = r"is a symbolic link \(to step_000003\)"
    elif kind == "link to a checkpoint":
        shutil.copytree(_step(stopped, 2), outside)
        os.symlink(outside, third)
        problem = "is a symbolic link"
    elif kind == "file":
        with open(third, "w") as handle:
            handle.write("not a folder")
        problem = "is not a folder"
    else:
        shutil.copytree(_step(stopped, 1), third)  # its manifest says step 1
        problem = r"manifest\.json is for step 1, not 3"
    with pytest.warns(UserWarning, match=rf"step_000003: {problem}.*resuming from step_000002"):
        assert _resume(tiny, stopped) == uninterrupted
    assert not os.path.islink(third) and ckpt.verify(third) is None
    assert _manifest(third)["step"] == 3
    assert _steps(stopped) == ["step_000001", "step_000002", "step_000003"]
    if kind == "link to a checkpoint":  # the link was replaced, what it pointed to is untouched
        assert _manifest(outside)["step"] == 2 and ckpt.verify(outside) is None


# ---- metrics.jsonl against the checkpoint's record count -----------------------------------


@pytest.mark.parametrize("damage", ["deleted", "cut short", "a line changed", "a line unreadable"])
def test_a_lost_or_damaged_metrics_log_is_restored_from_the_checkpoint(
    tiny, stopped, uninterrupted, damage
):
    path = os.path.join(stopped, "metrics.jsonl")
    with open(path) as handle:
        lines = handle.readlines()
    if damage == "deleted":
        os.remove(path)
    else:
        if damage == "cut short":
            lines = lines[:1]
        elif damage == "a line changed":
            lines[1] = json.dumps({**json.loads(lines[1]), "loss": 123.0}) + "\n"
        else:
            lines[1] = "{not json\n"
        with open(path, "w") as handle:
            handle.writelines(lines)
    with pytest.warns(UserWarning, match="restored from the checkpoint"):
        assert _resume(tiny, stopped) == uninterrupted


# ---- a fresh run's clean-up ----------------------------------------------------------------


def test_a_fresh_run_removes_what_killed_saves_left(tiny, stopped, tmp_path):
    root = os.path.join(stopped, "checkpoints")
    with open(os.path.join(root, "latest.tmp-4242"), "w") as handle:
        handle.write("step_000009\n")
    unfinished = os.path.join(root, ".step_000009.tmp-4242")
    os.makedirs(os.path.join(unfinished, "model"))
    with open(os.path.join(unfinished, "model", "model.safetensors"), "wb") as handle:
        handle.write(b"\0" * 100)
    Trainer(make_config(dict(**tiny, **{**RUN, "steps": 1}, run_dir=stopped))).run()
    left = [name for name in os.listdir(root) if name.startswith((".", "latest.tmp"))]
    assert left == []


# ---- loading runs no code ------------------------------------------------------------------


class _Evil:
    """Unpickled, creates a file: what a hostile checkpoint would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _as_format_1(folder, payload=None):
    """Checkpoint `folder` as the code before issue 23 wrote it: trainer_state.pt by torch.save,
    no metrics copy, a format-1 manifest (payload: extra objects put into the state)."""
    legacy = os.path.join(folder, LEGACY)
    if not os.path.exists(legacy):
        state = ckpt.read_trainer_state(folder)
        torch.save({**state, **(payload or {})}, legacy)
        os.remove(os.path.join(folder, STATE))
        os.remove(os.path.join(folder, "metrics.jsonl"))
    elif payload:
        state = torch.load(legacy, weights_only=False)
        torch.save({**state, **payload}, legacy)
    ckpt.write_manifest(folder, _manifest(folder)["step"])
    _write_manifest(folder, {**_manifest(folder), "format": 1})


def test_format_1_checkpoints_resume_exactly(tiny, stopped, uninterrupted):
    _as_format_1(_step(stopped, 2))
    assert _resume(tiny, stopped) == uninterrupted


def test_a_lost_log_of_a_format_1_checkpoint_is_named(tiny, stopped):
    _as_format_1(_step(stopped, 2))
    os.remove(os.path.join(stopped, "metrics.jsonl"))
    with pytest.warns(UserWarning, match=r"holds 0 of the 3 records.*so 3 are lost"):
        _resume(tiny, stopped)


def test_a_malicious_trainer_state_is_refused_and_never_runs(tiny, stopped, tmp_path, capsys):
    marker = tmp_path / "pwned"
    newest = _step(stopped, 2)
    _as_format_1(newest, payload={"scheduler_extra": _Evil(marker)})  # manifest resealed
    assert ckpt.verify(newest) is None
    with pytest.raises(ckpt.CheckpointError, match=r"trainer_state\.pt refused: .*posix\.system"):
        _resume(tiny, stopped)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(**tiny, **RUN, run_dir=stopped)))
    assert main(["train", "--config", str(config), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "opd-fast: error:" in err and "refused" in err and "Traceback" not in err
    assert not marker.exists()


def test_a_malicious_rank_file_is_refused_and_never_runs(tmp_path):
    from opd_fast.training.checkpoints import state_format

    marker = tmp_path / "pwned"
    path = str(tmp_path / "rank_00000.pt")
    torch.save({"rng": ckpt.rng_state(), "x": _Evil(marker)}, path)
    with pytest.raises(state_format.StateFormatError, match=r"rank_00000\.pt refused"):
        state_format.load_legacy(path)
    assert not marker.exists()
    torch.save({"rng": ckpt.rng_state()}, path)  # what format 1 wrote: loads
    assert set(state_format.load_legacy(path)["rng"]) >= {"python", "numpy", "torch"}


def test_dcp_metadata_is_read_without_running_code(tmp_path):
    import pickle

    from torch.distributed.checkpoint import save as dcp_save

    from opd_fast.training.checkpoints.sharded import load_dcp

    model = torch.nn.Linear(4, 3)
    folder = str(tmp_path / "dcp")
    dcp_save({"model": model.state_dict()}, checkpoint_id=folder)
    target = {"model": torch.nn.Linear(4, 3).state_dict()}
    load_dcp(target, folder)  # DCP's own metadata classes are allowed
    torch.testing.assert_close(target["model"]["weight"], model.weight.detach())
    marker = tmp_path / "pwned"
    with open(os.path.join(folder, ".metadata"), "wb") as handle:
        pickle.dump(_Evil(marker), handle)
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata refused: .*system is not allowed"):
        load_dcp(target, folder)
    assert not marker.exists()


def test_a_damaged_zip_member_under_a_resealed_manifest_is_passed_over(
    tiny, stopped, uninterrupted
):
    newest = _step(stopped, 2)
    _as_format_1(newest)
    from opd_fast.training.checkpoints import state_format

    legacy = os.path.join(newest, LEGACY)
    with zipfile.ZipFile(legacy) as archive:  # a tensor's bytes: torch.load would read them
        member = max(archive.infolist(), key=lambda info: info.file_size)
    offset = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    with open(legacy, "r+b") as handle:
        handle.seek(offset + member.file_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    ckpt.write_manifest(newest, 2)  # resealed over the damage
    with pytest.raises(state_format.StateFormatError, match="does not match its CRC"):
        state_format.load_legacy(legacy)
    with pytest.warns(UserWarning, match=r"trainer_state\.pt: member .* does not match its CRC"):
        assert _resume(tiny, stopped) == uninterrupted


# ---- a save the file system refuses ----------------------------------------------------------


def test_an_injected_enospc_in_any_writer_is_a_named_error(tiny, stopped, monkeypatch):
    """Each kind of error a full disk raises here: safetensors' (no errno), Python's, and
    torch.save's "unexpected pos" (none at all: the free space decides)."""
    from safetensors import SafetensorError

    from opd_fast.training.checkpoints import state_format

    config = make_config(dict(**tiny, **RUN, run_dir=stopped))
    kinds = [
        SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        ),
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 982"),
    ]
    for error in kinds:

        def full(path, state, error=error):
            with open(path, "wb") as handle:
                handle.write(b"\0" * 1000)  # half written, then the disk is full
            raise error

        monkeypatch.setattr(state_format, "save_state", full)
        monkeypatch.setattr(ckpt, "_free_bytes", lambda path: 4096)
        trainer = Trainer(config)
        trainer.restore()
        trainer.train_step()
        quota = "quota" in str(error)
        cause = "the disk quota is exceeded" if quota else "no space left on the device"
        with pytest.raises(ckpt.CheckpointSaveError, match=rf"step_000003 .*: {cause}\. The save "
                           r"needs about 0\.\d\d MiB; 0\.00 MiB free there now; the checkpoints "
                           r"saved before are intact"):  # fmt: skip
            trainer.save()
        assert _steps(stopped) == ["step_000001", "step_000002"]  # no leftover, nothing lost
        assert ckpt.verify(_step(stopped, 2)) is None
    monkeypatch.setattr(ckpt, "_free_bytes", lambda path: 2**40)  # plenty: not the disk's fault
    trainer = Trainer(config)
    with pytest.raises(RuntimeError, match="unexpected pos"):
        trainer.save()


def test_an_injected_permission_error_is_named(tiny, stopped, monkeypatch):
    def refused(run_dir, step):
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(run_dir, "x"))

    monkeypatch.setattr(single_module, "begin_checkpoint", refused)
    trainer = Trainer(make_config(dict(**tiny, **RUN, run_dir=stopped)))
    with pytest.raises(ckpt.CheckpointSaveError, match=r"permission denied \(.*/x\).*make .* wri"):
        trainer.save()


def _can_mount_tmpfs() -> list[str] | None:
    """The unshare command that gives a private mount namespace here, or None."""
    base = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "-r", "--mount"]
    try:
        probe = subprocess.run(
            [*base, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt && echo ok"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return base if probe.stdout.strip() == "ok" else None


FULL_DISK = textwrap.dedent(
    """
    import json, os, shutil, subprocess, sys, warnings
    from opd_fast.training.checkpoints import folders
    from opd_fast.training.config import make_config
    from opd_fast.training.trainer import Trainer
    values, mount, free_left, read_only = json.loads(sys.argv[1])
    run_dir = values["run_dir"]
    Trainer(make_config(values)).run(stop_after=1)
    root = os.path.join(run_dir, "checkpoints")
    if read_only:  # only the checkpoints: the run's log stays writable
        subprocess.run(["mount", "--bind", root, root], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", root], check=True)
    else:
        with open(os.path.join(mount, "filler"), "wb") as handle:
            try:
                handle.write(bytes(max(shutil.disk_usage(mount).free - free_left, 0)))
            except OSError:
                pass
    config = os.path.join(mount, "..", "config.json")
    with open(config, "w") as handle:
        json.dump(values, handle)
    cli = subprocess.run([sys.executable, "-m", "opd_fast", "train", "--config", config,
                          "--resume"], capture_output=True, text=True)
    result = {"returncode": cli.returncode, "stderr": cli.stderr,
              "entries": sorted(os.listdir(root)),
              "step_1": folders.verify(os.path.join(root, "step_000001"))}
    if read_only:
        subprocess.run(["umount", root], check=True)
    else:
        os.remove(os.path.join(mount, "filler"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(make_config(values)).run(resume=True)  # space again: the run goes on
    timing = ("per_s", "seconds", "memory")
    from opd_fast.training.metrics import MetricsLog
    rows = MetricsLog(os.path.join(run_dir, "metrics.jsonl")).read()
    result["records"] = [{k: v for k, v in r.items() if not any(t in k for t in timing)}
                         for r in rows]
    print("RESULT " + json.dumps(result))
    """
)


@pytest.mark.parametrize(
    ("free_left", "read_only", "message"),
    [
        (40_000, False, "no space left on the device"),  # the weights do not fit
        (150_000, False, "no space left on the device"),  # the trainer state does not
        (0, True, "the file system is read-only"),
    ],
)
def test_a_real_full_or_read_only_disk_ends_the_save_with_a_named_error(
    tiny, uninterrupted, tmp_path, free_left, read_only, message
):
    unshare = _can_mount_tmpfs()
    if unshare is None:
        pytest.skip("no private mount namespace here (unshare) for a small tmpfs")
    mount = tmp_path / "disk"
    mount.mkdir()
    values = dict(**tiny, **RUN, run_dir=str(mount / "run"))
    script = f'mount -t tmpfs -o size=4m tmpfs {mount} && exec {sys.executable} -c "$0" "$1"'
    done = subprocess.run(
        [
            *unshare,
            "sh",
            "-c",
            script,
            FULL_DISK,
            json.dumps([values, str(mount), free_left, read_only]),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OPD_FAST_THREADS="1"),
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["returncode"] == 1, result["stderr"][-2000:]
    where = f"opd-fast: error: cannot save checkpoint step_000002 in {mount}/run/checkpoints: "
    assert where + message in result["stderr"] and "The save needs about" in result["stderr"]
    assert "Traceback" not in result["stderr"]
    assert result["step_1"] is None  # the previous checkpoint is intact
    assert result["entries"] == ["latest", "step_000001"]  # no half-written copy left
    assert result["records"] == uninterrupted  # resumed once there was room: nothing lost
