"""Any checkpoint of a run, single-process or sharded, as a Hugging Face model folder
(safetensors weights, config, tokenizer): what transformers and `opd-fast serve-teacher` load.
"""

from __future__ import annotations

import os
import shutil
import warnings

from opd_fast.training.checkpoints import folders
from opd_fast.training.checkpoints.sharded import DCP_DIR, load_dcp


def checkpoint_folder(run_dir: str, step: int | None) -> str:
    """Checkpoint `step` of the run (None: the newest intact one), verified."""
    if step is None:
        path = folders.latest_checkpoint(run_dir)
        if path is None:
            raise folders.CheckpointError(f"{run_dir} holds no intact checkpoint")
        return path
    path = os.path.join(run_dir, "checkpoints", f"step_{step:06d}")
    if not os.path.isdir(path):
        root = os.path.join(run_dir, "checkpoints")
        have = (
            sorted(d for d in os.listdir(root) if d.startswith("step_"))
            if os.path.isdir(root)
            else []
        )
        raise folders.CheckpointError(f"{path} does not exist; the run has {have or 'none'}")
    problem = folders.verify(path)
    if problem is not None:
        raise folders.CheckpointError(f"{path} is damaged: {problem}")
    return path


def export(run_dir: str, step: int | None, out: str) -> str:
    """Write checkpoint `step` of the run (None: the newest) as a Hugging Face model folder at
    `out` (safetensors weights, config, tokenizer): what transformers and serve-teacher load.
    Sharded checkpoints are consolidated here, in this one process (no process group)."""
    path = checkpoint_folder(run_dir, step)
    model_dir = os.path.join(path, "model")
    if os.path.exists(out) and os.listdir(out):
        raise ValueError(f"export: {out} exists and is not empty")
    has_weights = any(name.endswith(".safetensors") for name in os.listdir(model_dir))
    if has_weights:
        shutil.copytree(model_dir, out, dirs_exist_ok=True)
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    state = model.state_dict()
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.filterwarnings("ignore", message=".*load in a single process")
        load_dcp({"model": state}, os.path.join(path, DCP_DIR))
    model.load_state_dict(state)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out
