"""Sealed checkpoint folders, whatever writes them (the single-process and the sharded
checkpointer): <run_dir>/checkpoints/step_000050/ with a manifest.json of every file's size
and sha256.

A checkpoint is written under a temporary name (`begin_checkpoint`), its manifest last, then
renamed into place (`finish_checkpoint`); re-saving a step moves the old copy aside before the
new one takes its name and deletes it only then, so no kill ever leaves a step without a copy.

Resuming never trusts one pointer: it scans every step folder (and the temporary copies a kill
left behind), takes the newest whose files match its manifest, and says which damaged ones
it passed over: a manifest of the wrong shape or for another step, a step folder that is a
symbolic link or a file. The next save of such a step replaces it (moved aside, never
followed). `latest` names the newest checkpoint for people; nothing reads it.

A save that fails for the file system's sake (no space, quota, permissions, read-only) is a
CheckpointSaveError naming which and the space the save needs; its temporary folder is
removed and every earlier checkpoint is left as it was.

The resume state is a safetensors file with JSON (`state_format`): loading a checkpoint runs
no code from it. Format 1 checkpoints (trainer_state.pt) still load, without unpickling
anything but tensors, containers and NumPy RNG state.
"""

from __future__ import annotations

import contextlib
import errno
import glob
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

from opd_fast.training.checkpoints import state_format

KEEP_LAST = 3
MANIFEST = "manifest.json"
FORMAT = 2  # 1: trainer_state.pt (torch.save); 2: trainer_state.safetensors + metrics copy
FORMATS = (1, 2)  # the ones this version reads

# Tests set this to "stage" or "stage:n" (the n-th save, from 1) to kill the process with
# SIGKILL at that point of save_checkpoint: what a power cut or the OOM killer does.
FAULT_ENV = "OPD_FAST_CHECKPOINT_FAULT"
SAVE_STAGES = ("weights", "state", "manifest", "aside", "renamed", "latest", "pruned")
_saves = 0

_NAME = re.compile(r"^\.?step_(\d+)(\.(tmp|old)-\d+)?$")


class CheckpointError(ValueError):
    """No usable checkpoint where one was expected; the message names what is wrong."""


class CheckpointSaveError(OSError):
    """A checkpoint the file system would not take (no space, quota, permissions, read-only):
    the message says which and how much space the save needs; earlier checkpoints are intact."""


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


def _manifest_problem(manifest: Any) -> str | None:
    """What is wrong with a parsed manifest's shape (None: nothing)."""
    if not isinstance(manifest, dict):
        return f"is not an object (got {type(manifest).__name__})"
    if manifest.get("format", 1) not in FORMATS:
        return f"has format {manifest.get('format')!r}; this opd_fast reads {FORMATS}"
    step = manifest.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return f"has no integer step (got {step!r})"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return f"has no files mapping (got {type(files).__name__})"
    for path, entry in files.items():
        parts = path.replace("\\", "/").split("/")
        if not path or os.path.isabs(path) or ".." in parts or path == MANIFEST:
            return f"lists a path outside its folder: {path!r}"
        if not isinstance(entry, dict):
            return f"entry {path!r} is not an object (got {entry!r:.40})"
        size, digest = entry.get("bytes"), entry.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            return f"entry {path!r} has no byte count (got {size!r})"
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            return f"entry {path!r} has no sha256 (got {digest!r})"
    if not any(name in files for name in (TRAINER_STATE, LEGACY_TRAINER_STATE)):
        return f"lists no {TRAINER_STATE}"
    return None


def _folder_step(folder: str) -> int | None:
    match = _NAME.match(os.path.basename(os.path.normpath(folder)))
    return int(match.group(1)) if match else None


def verify(folder: str) -> str | None:
    """None when `folder` is an intact checkpoint, else what is wrong with it (naming the
    file): a link or not a folder, a manifest of the wrong shape or for another step than the
    folder's name, a file missing, of the wrong size or checksum. A checkpoint written before
    manifests existed passes if its files are there."""
    if os.path.islink(folder):
        return f"is a symbolic link (to {os.readlink(folder)}), not a checkpoint folder"
    if not os.path.isdir(folder):
        return "is not a folder"
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.lexists(manifest_path):
        for needed in (LEGACY_TRAINER_STATE, os.path.join("model", "config.json")):
            if not os.path.isfile(os.path.join(folder, needed)):
                return f"{needed} is missing (and there is no {MANIFEST})"
        return None
    try:
        if os.path.islink(manifest_path):
            raise ValueError("it is a symbolic link")
        with open(manifest_path) as handle:
            manifest = json.load(handle)
    except (OSError, ValueError, RecursionError) as error:
        return f"{MANIFEST} is unreadable ({error})"
    problem = _manifest_problem(manifest)
    if problem is not None:
        return f"{MANIFEST} {problem}"
    expected = _folder_step(folder)
    if expected is not None and manifest["step"] != expected:
        return f"{MANIFEST} is for step {manifest['step']}, not {expected} (the folder's name)"
    for path, entry in manifest["files"].items():
        full = os.path.join(folder, path)
        if os.path.islink(full) or not os.path.isfile(full):
            return f"{path} is missing" if not os.path.lexists(full) else f"{path} is not a file"
        size = os.path.getsize(full)
        if size != entry["bytes"]:
            return f"{path} has {size} bytes, its manifest says {entry['bytes']}"
        if _sha256(full) != entry["sha256"]:
            return f"{path} does not match its checksum (damaged)"
        if path.endswith(".pt"):  # format 1: torch.load skips the zip's CRCs
            problem = state_format.zip_problem(full)
            if problem is not None:
                return f"{path}: {problem}"
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


TRAINER_STATE = "trainer_state.safetensors"
LEGACY_TRAINER_STATE = "trainer_state.pt"  # format 1
METRICS_COPY = "metrics.jsonl"  # the run's records up to the checkpoint (format 2)


def write_trainer_state(
    folder: str, step: int, state: dict[str, Any], metrics_lines: list[str] | None = None
) -> None:
    """The resume state (everything but the weights) of checkpoint `step` into `folder`, and
    a copy of the run's metrics.jsonl lines up to it (restored on resume if the run's copy is
    lost or cut short)."""
    try:
        state_format.save_state(os.path.join(folder, TRAINER_STATE), {"step": step, **state})
    except state_format.StateFormatError as error:
        raise CheckpointError(str(error)) from None
    if metrics_lines is not None:
        with open(os.path.join(folder, METRICS_COPY), "w") as handle:
            handle.writelines(metrics_lines)


def read_trainer_state(folder: str) -> dict[str, Any]:
    """write_trainer_state's dict (with "step"), or a format-1 checkpoint's; CheckpointError
    naming a damaged file, or one that would run code to load."""
    path = os.path.join(folder, TRAINER_STATE)
    try:
        if os.path.isfile(path):
            state = state_format.load_state(path)
        else:
            path = os.path.join(folder, LEGACY_TRAINER_STATE)
            state = state_format.load_legacy(path)
    except state_format.StateFormatError as error:
        raise CheckpointError(str(error)) from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path} holds no trainer state (no integer step)")
    expected = _folder_step(folder)
    if expected is not None and state["step"] != expected:
        raise CheckpointError(f"{path} is the state of step {state['step']}, not {expected}")
    return state


def read_metrics_copy(folder: str) -> list[str] | None:
    """The metrics.jsonl lines the checkpoint keeps (None: a format-1 checkpoint has none)."""
    path = os.path.join(folder, METRICS_COPY)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return handle.readlines()


# ---- saving: file system errors -------------------------------------------------------------

_ERRNO_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the file system is read-only",
    errno.EFBIG: "a file would exceed the size the system allows",
}
_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# The same in the messages of errors that carry no errno: safetensors' (Rust io::Error kinds).
_TEXT_CAUSES = (
    ("no space left", errno.ENOSPC),
    ("storagefull", errno.ENOSPC),
    ("quota", errno.EDQUOT),
    ("permission denied", errno.EACCES),
    ("permissiondenied", errno.EACCES),
    ("read-only file system", errno.EROFS),
    ("readonlyfilesystem", errno.EROFS),
    ("file too large", errno.EFBIG),
    ("filetoolarge", errno.EFBIG),
)
# torch.save's writer says only this when a write fails (ENOSPC among others).
_SHORT_WRITE = re.compile(r"unexpected pos|file write failed|PytorchStreamWriter failed")


def _cause(error: BaseException) -> tuple[int | None, str | None]:
    """(errno, file) of the file system error behind `error` (or its causes), else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _ERRNO_CAUSES:
            return error.errno, error.filename
        failures = getattr(error, "failures", None)  # DCP: each rank's exception
        for failure in failures.values() if isinstance(failures, dict) else ():
            failure = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(failure, BaseException) and failure is not error:
                found = _cause(failure)
                if found[0] is not None:
                    return found
        text = str(error)
        code = re.search(r"Os \{ code: (\d+)|\(os error (\d+)\)", text)  # Rust io::Error
        number = int(code.group(1) or code.group(2)) if code else None
        if number in _ERRNO_CAUSES:
            return number, None
        lowered = text.lower()
        for needle, number in _TEXT_CAUSES:
            if needle in lowered:
                return number, None
        error = error.__cause__ or error.__context__
    return None, None


def _mib(count: float) -> str:
    return f"{count / 2**20:.2f} MiB"


def save_size(run_dir: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """About the bytes a checkpoint of `model` and `optimizer` takes: the newest checkpoint's
    size when the run has one, else every distinct tensor of the model's state and the
    optimizer's (whole sizes, for sharded ones too) and 64 KiB for the rest."""
    root = _checkpoint_root(run_dir)
    for _, in_place, path in _candidates(root) if os.path.isdir(root) else []:
        if in_place and not os.path.islink(path) and os.path.isdir(path):
            return sum(
                os.lstat(os.path.join(parent, name)).st_size
                for parent, _, names in os.walk(path)
                for name in names
            )
    tensors = list(model.state_dict().values())
    if optimizer is not None:
        for per_parameter in optimizer.state.values():
            tensors += [v for v in per_parameter.values() if isinstance(v, torch.Tensor)]
    total, seen = 0, set()
    for tensor in tensors:
        try:
            key = tensor.untyped_storage().data_ptr()
        except Exception:  # a DTensor or a meta tensor: count it
            key = None
        if key is not None and key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total + 2**16  # config, tokenizer, manifest, trainer state besides the tensors


@contextlib.contextmanager
def saving(run_dir: str, step: int, needed_bytes: int):
    """Around one save of checkpoint `step`: a file system error (no space, quota,
    permissions, read-only; torch.save's "unexpected pos" when the disk is full) becomes a
    one-line CheckpointSaveError with the space the save needs, after the temporary folder
    is removed. Anything else is raised as it is."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:  # DCP's CheckpointException is a BaseException
        root = _checkpoint_root(run_dir)
        for temporary in glob.glob(os.path.join(glob.escape(root), f".step_{step:06d}.tmp-*")):
            _remove(temporary)  # this save's (whichever rank made it); the space is free again
        number, filename = _cause(error)
        free = _free_bytes(root)
        if number is None and _SHORT_WRITE.search(str(error)) and free is not None:
            if free < needed_bytes:  # torch's writer lost the errno; the disk says why
                number = errno.ENOSPC
        if number is None:
            raise
        where = f" ({filename})" if filename else ""
        space = f"; {_mib(free)} free there now" if free is not None else ""
        remedy = "free some space" if number in _SPACE else f"make {root} writable"
        failure = CheckpointSaveError(
            f"cannot save checkpoint step_{step:06d} in {root}: {_ERRNO_CAUSES[number]}"
            f"{where}. The save needs about {_mib(needed_bytes)}{space}; the checkpoints "
            f"saved before are intact. To go on, {remedy} and resume (--resume)"
        )
        failure.errno = number
        raise failure from None


def _free_bytes(path: str) -> int | None:
    while path and not os.path.isdir(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or ".").free
    except OSError:
        return None


def begin_checkpoint(run_dir: str, step: int) -> str:
    """The empty temporary folder checkpoint `step` is written into (then finish_checkpoint)."""
    global _saves
    _saves += 1
    root = _checkpoint_root(run_dir)
    os.makedirs(root, exist_ok=True)
    temporary = os.path.join(root, f".step_{step:06d}.tmp-{os.getpid()}")
    _remove(temporary)
    os.makedirs(temporary)
    return temporary


def _remove(path: str) -> None:
    """Delete a file, a link (never what it points to) or a folder tree; quietly."""
    try:
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
            os.unlink(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass


def finish_checkpoint(run_dir: str, step: int, temporary: str) -> str:
    """Seal the fully written `temporary` folder: its manifest, then renamed into place (an
    older copy of the step kept aside until the new one is in), `latest`, pruning."""
    root = _checkpoint_root(run_dir)
    name = f"step_{step:06d}"
    final = os.path.join(root, name)
    write_manifest(temporary, step)
    fault("manifest")
    aside = None
    # Re-saving a step (or replacing a link or file in its place): keep the old entry aside,
    # moved (a link as a link), until the new copy is in.
    if os.path.lexists(final):
        aside = os.path.join(root, f".{name}.old-{os.getpid()}")
        _remove(aside)
        os.replace(final, aside)
        fault("aside")
    try:
        os.replace(temporary, final)
    except BaseException:
        if aside is not None:
            os.replace(aside, final)
        raise
    fault("renamed")
    if aside is not None:
        _remove(aside)
    try:  # the checkpoint is in: `latest` is for people, its failure is only a warning
        _write_text_atomic(os.path.join(root, "latest"), name + "\n")
    except OSError as error:
        _remove(os.path.join(root, f"latest.tmp-{os.getpid()}"))
        warnings.warn(
            f"{final} is saved, but {root}/latest could not be updated: {error}", stacklevel=2
        )
    fault("latest")
    _prune(root, keep=KEEP_LAST)
    fault("pruned")
    return final


def _prune(root: str, keep: int) -> None:
    steps = sorted(d for d in os.listdir(root) if _NAME.match(d) and d.startswith("step_"))
    for old in steps[:-keep]:
        _remove(os.path.join(root, old))


def _candidates(root: str) -> list[tuple[int, bool, str]]:
    """(step, is a step_N entry, path) of every checkpoint entry, a kill's leftovers and
    links or files under a step's name too (verify says what is wrong with those)."""
    found = []
    for name in os.listdir(root):
        match = _NAME.match(name)
        if match:
            found.append((int(match.group(1)), match.group(2) is None, os.path.join(root, name)))
    return sorted(found, reverse=True)


def _remove_leftovers(root: str) -> None:
    """The temporary copies and `latest.tmp-PID` files that killed saves left behind."""
    for _, in_place, path in _candidates(root):
        if not in_place:
            _remove(path)
    for path in glob.glob(os.path.join(glob.escape(root), "latest.tmp-*")):
        _remove(path)


def tidy(run_dir: str) -> None:
    """A fresh run's clean-up of what killed saves left in its folder: a complete copy that a
    kill left under a temporary name is moved into place when its step has no intact folder
    (nothing saved is lost), the rest (unfinished copies, `latest.tmp-PID`) removed."""
    root = _checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return
    for step, in_place, path in _candidates(root):
        final = os.path.join(root, f"step_{step:06d}")
        if not in_place and not os.path.lexists(final) and _complete_copy(path):
            os.replace(path, final)
    _remove_leftovers(root)


def _complete_copy(path: str) -> bool:
    return os.path.lexists(os.path.join(path, MANIFEST)) and verify(path) is None


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
        if not in_place and not os.path.lexists(os.path.join(path, MANIFEST)):
            problem = "an unfinished copy (no manifest)"
        else:
            problem = verify(path)
        if problem is not None:
            damaged.append(f"{os.path.basename(path)}: {problem}")
            continue
        chosen = path
        if not in_place:  # a kill's complete copy: the step's only intact one
            final = os.path.join(root, f"step_{step:06d}")
            if os.path.lexists(final):
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
    _remove_leftovers(root)
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


_ADAPTER_DIR = "adapter"  # a LoRA run's adapter folder (opd_fast.training.lora.ADAPTER_DIR)


def check_lora_match(path: str, lora: bool) -> None:
    """CheckpointError when checkpoint `path` and the run disagree on LoRA."""
    saved = os.path.isdir(os.path.join(path, _ADAPTER_DIR))
    if saved and not lora:
        raise CheckpointError(
            f"{path} holds LoRA adapters only; resume it with the run's lora_* keys (lora_rank "
            "> 0), or export it (opd-fast export)"
        )
    if lora and not saved:
        raise CheckpointError(
            f"{path} holds a fully fine-tuned student, not LoRA adapters; resume it without "
            "lora_rank (or start a new run folder)"
        )
