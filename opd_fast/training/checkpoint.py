"""Checkpoints: student weights (safetensors) plus everything needed to resume exactly.

Layout: <run_dir>/checkpoints/step_000050/{model/, trainer_state.pt} and a `latest` file
naming the newest. Every write goes to a temporary name first and is renamed into place, so
a crash or Ctrl-C mid-write never leaves a half checkpoint where `latest` points.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

KEEP_LAST = 3


def _checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def _write_text_atomic(path: str, text: str) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


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


@dataclass
class Checkpoint:
    step: int
    model_dir: str
    trainer_state: dict[str, Any]


def save_checkpoint(run_dir, step, model, tokenizer, trainer_state: dict[str, Any]) -> str:
    """Write checkpoint `step` atomically and point `latest` at it; returns its directory."""
    root = _checkpoint_root(run_dir)
    os.makedirs(root, exist_ok=True)
    name = f"step_{step:06d}"
    final = os.path.join(root, name)
    temporary = os.path.join(root, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(os.path.join(temporary, "model"), safe_serialization=True)
    tokenizer.save_pretrained(os.path.join(temporary, "model"))
    torch.save({"step": step, **trainer_state}, os.path.join(temporary, "trainer_state.pt"))
    if os.path.exists(final):  # re-saving the same step (e.g. Ctrl-C right after a save)
        shutil.rmtree(final)
    os.replace(temporary, final)
    _write_text_atomic(os.path.join(root, "latest"), name + "\n")
    _prune(root, keep=KEEP_LAST)
    return final


def _prune(root: str, keep: int) -> None:
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_"))
    for old in steps[:-keep]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def latest_checkpoint(run_dir: str) -> str | None:
    pointer = os.path.join(_checkpoint_root(run_dir), "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as handle:
        path = os.path.join(_checkpoint_root(run_dir), handle.read().strip())
    return path if os.path.isdir(path) else None


def load_checkpoint(path: str) -> Checkpoint:
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    return Checkpoint(
        step=int(state["step"]), model_dir=os.path.join(path, "model"), trainer_state=state
    )


def load_weights(model: torch.nn.Module, model_dir: str) -> None:
    """Copy safetensors weights from a checkpoint's model dir into `model` in place."""
    from safetensors.torch import load_file

    state = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(model_dir, name)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied output embeddings are saved once; anything else missing is a real problem.
    missing = [m for m in missing if "lm_head" not in m]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {model_dir} does not match the model: missing {missing}, "
            f"unexpected {unexpected}"
        )
