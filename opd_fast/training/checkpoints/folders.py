"""Sealed checkpoint folders, whatever writes them (the single-process and the sharded
checkpointer): <run_dir>/checkpoints/step_000050/ with a manifest.json of every file's size
and sha256.

A checkpoint is written under a temporary name (`begin_checkpoint`), its manifest last, then
renamed into place (`finish_checkpoint`); re-saving a step moves the old copy aside before the
new one takes its name and deletes it only then, so no kill ever leaves a step without a copy.

Resuming never trusts one pointer: it scans every step folder (and the temporary copies a kill
left behind), takes the newest whose files match its manifest, and says which damaged ones
it passed over. `latest` names the newest checkpoint for people; nothing reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import warnings
from typing import Any

import numpy as np
import torch

KEEP_LAST = 3
MANIFEST = "manifest.json"
FORMAT = 1

# Tests set this to "stage" or "stage:n" (the n-th save, from 1) to kill the process with
# SIGKILL at that point of save_checkpoint: what a power cut or the OOM killer does.
FAULT_ENV = "OPD_FAST_CHECKPOINT_FAULT"
SAVE_STAGES = ("weights", "state", "manifest", "aside", "renamed", "latest", "pruned")
_saves = 0

_NAME = re.compile(r"^\.?step_(\d+)(\.(tmp|old)-\d+)?$")


class CheckpointError(ValueError):
    """No usable checkpoint where one was expected; the message names what is wrong."""


def _checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def fault(stage: str) -> None:
    """SIGKILL this process at save stage `stage` when FAULT_ENV asks for it (tests)."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    name, _, count = wanted.partition(":")
    if name == stage and (not count or int(count) == _saves):
        os.kill(os.getpid(), signal.SIGKILL)


def _write_text_atomic(path: str, text: str) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: str) -> list[str]:
    """Every file under `folder` but the manifest, as sorted relative paths."""
    found = []
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.relpath(os.path.join(parent, name), folder)
            if path != MANIFEST:
                found.append(path)
    return sorted(found)


def write_manifest(folder: str, step: int) -> None:
    """Record the size and sha256 of every file of `folder` (written last, atomically)."""
    files = {
        path: {"bytes": os.path.getsize(os.path.join(folder, path)), "sha256": None}
        for path in _files(folder)
    }
    for path, entry in files.items():
        entry["sha256"] = _sha256(os.path.join(folder, path))
    manifest = {"format": FORMAT, "step": step, "files": files}
    _write_text_atomic(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1))


def verify(folder: str) -> str | None:
    """None when `folder` is an intact checkpoint, else what is wrong with it (naming the
    file). A checkpoint written before manifests existed passes if its files are there."""
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.exists(manifest_path):
        for needed in (TRAINER_STATE, os.path.join("model", "config.json")):
            if not os.path.exists(os.path.join(folder, needed)):
                return f"{needed} is missing (and there is no {MANIFEST})"
        return None
    try:
        with open(manifest_path) as handle:
            files = json.load(handle)["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{MANIFEST} is unreadable ({error})"
    for path, entry in files.items():
        full = os.path.join(folder, path)
        if not os.path.isfile(full):
            return f"{path} is missing"
        size = os.path.getsize(full)
        if size != entry["bytes"]:
            return f"{path} has {size} bytes, its manifest says {entry['bytes']}"
        if _sha256(full) != entry["sha256"]:
            return f"{path} does not match its checksum (damaged)"
    return None


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


TRAINER_STATE = "trainer_state.pt"


def write_trainer_state(folder: str, step: int, state: dict[str, Any]) -> None:
    """The resume state (everything but the weights) of checkpoint `step` into `folder`."""
    torch.save({"step": step, **state}, os.path.join(folder, TRAINER_STATE))


def read_trainer_state(folder: str) -> dict[str, Any]:
    """write_trainer_state's dict (with "step"); CheckpointError naming a damaged file."""
    state_path = os.path.join(folder, TRAINER_STATE)
    try:
        state = torch.load(state_path, weights_only=False)
    except Exception as error:  # torch raises many kinds on a damaged file
        raise CheckpointError(f"cannot read {state_path}: {error}") from None
    state["step"] = int(state["step"])
    return state


def begin_checkpoint(run_dir: str, step: int) -> str:
    """The empty temporary folder checkpoint `step` is written into (then finish_checkpoint)."""
    global _saves
    _saves += 1
    root = _checkpoint_root(run_dir)
    os.makedirs(root, exist_ok=True)
    temporary = os.path.join(root, f".step_{step:06d}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    return temporary


def finish_checkpoint(run_dir: str, step: int, temporary: str) -> str:
    """Seal the fully written `temporary` folder: its manifest, then renamed into place (an
    older copy of the step kept aside until the new one is in), `latest`, pruning."""
    root = _checkpoint_root(run_dir)
    name = f"step_{step:06d}"
    final = os.path.join(root, name)
    write_manifest(temporary, step)
    fault("manifest")
    aside = None
    if os.path.exists(final):  # re-saving a step: keep the old copy until the new one is in
        aside = os.path.join(root, f".{name}.old-{os.getpid()}")
        os.replace(final, aside)
        fault("aside")
    os.replace(temporary, final)
    fault("renamed")
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    _write_text_atomic(os.path.join(root, "latest"), name + "\n")
    fault("latest")
    _prune(root, keep=KEEP_LAST)
    fault("pruned")
    return final


def _prune(root: str, keep: int) -> None:
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_"))
    for old in steps[:-keep]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def _candidates(root: str) -> list[tuple[int, bool, str]]:
    """(step, is a step_N folder, path) of every checkpoint folder, a kill's leftovers too."""
    found = []
    for name in os.listdir(root):
        match = _NAME.match(name)
        if match and os.path.isdir(os.path.join(root, name)):
            found.append((int(match.group(1)), match.group(2) is None, os.path.join(root, name)))
    return sorted(found, reverse=True)


def find_checkpoint(run_dir: str) -> str | None:
    """The newest intact checkpoint of the run, or None when the run has none at all.

    Damaged ones are passed over with a warning naming the file; a complete copy that a kill
    left under a temporary name is moved into place first. Leftovers are cleaned up. Raises
    CheckpointError when checkpoints exist but none is intact.
    """
    root = _checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return None
    candidates = _candidates(root)
    chosen, damaged = None, []
    for step, in_place, path in candidates:
        if not in_place and not os.path.exists(os.path.join(path, MANIFEST)):
            problem = "an unfinished copy (no manifest)"
        else:
            problem = verify(path)
        if problem is not None:
            damaged.append(f"{os.path.basename(path)}: {problem}")
            continue
        chosen = path
        if not in_place:  # a kill's complete copy: the step's only intact one
            final = os.path.join(root, f"step_{step:06d}")
            if os.path.exists(final):
                os.replace(final, os.path.join(root, f".step_{step:06d}.old-{os.getpid()}"))
            os.replace(path, final)
            chosen = final
        break
    if damaged and chosen is not None:
        warnings.warn(
            f"checkpoints passed over as damaged: {'; '.join(damaged)}; resuming from "
            f"{os.path.basename(chosen)}",
            stacklevel=2,
        )
    if chosen is None and candidates:
        raise CheckpointError(
            f"{root} holds no intact checkpoint ({'; '.join(damaged)}); nothing to resume from. "
            "Run without --resume to start over (the run folder's history is then replaced)."
        )
    for _, in_place, path in _candidates(root):
        if not in_place:
            shutil.rmtree(path, ignore_errors=True)
    return chosen


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest intact checkpoint (for messages: no repair, no warnings), or None."""
    root = _checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return None
    for _, in_place, path in _candidates(root):
        if in_place and verify(path) is None:
            return path
    return None
