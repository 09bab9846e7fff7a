"""Checkpoints of a multi-rank run (torch.distributed.checkpoint), with the guarantees of
opd_fast.training.checkpoint: written under a temporary name, sealed by a manifest of
checksums, renamed into place, found again by the same scan. And the export of any checkpoint
as a Hugging Face model folder.

A sharded step folder holds:
    dcp/                    the student's and AdamW's sharded state (every rank writes its part)
    rank_00000.pt, ...      each rank's RNG state
    trainer_state.pt        rank 0: scheduler, sampler (the data position, the same on every
                            rank), metrics count, config, world size
    model/                  config and tokenizer; at the run's end also the consolidated
                            safetensors weights (a folder transformers loads)
    manifest.json           written last, by rank 0, after every rank's files are in
"""

from __future__ import annotations

import os
import shutil
import warnings

import torch

from opd_fast.training import checkpoint as ckpt
from opd_fast.training.distributed import Distributed

DCP_DIR = "dcp"


def _rank_file(folder: str, rank: int) -> str:
    return os.path.join(folder, f"rank_{rank:05d}.pt")


def is_sharded_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, DCP_DIR))


def _full_model_state(model) -> dict[str, torch.Tensor]:
    """The unsharded weights on rank 0's CPU (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def _write_model_folder(model_config, state: dict | None, tokenizer, folder: str) -> None:
    """config (+ weights when `state` is given) and tokenizer as a Hugging Face folder."""
    from transformers import AutoModelForCausalLM

    if state is None:
        model_config.save_pretrained(folder)
    else:
        fresh = AutoModelForCausalLM.from_config(model_config)
        fresh.load_state_dict(state)
        fresh.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def save(
    dist: Distributed,
    run_dir: str,
    step: int,
    model,
    optimizer,
    tokenizer,
    trainer_state: dict,
    rank_state: dict,
    consolidate: bool = False,
) -> str:
    """Checkpoint `step` of a multi-rank run (every rank calls this); consolidate: also write
    the full weights into model/ (the run's end). Returns the step folder."""
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    temporary = dist.on_main(lambda: ckpt.begin_checkpoint(run_dir, step))
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp_save(
        {"model": model_state, "optimizer": optimizer_state},
        checkpoint_id=os.path.join(temporary, DCP_DIR),
    )
    torch.save(rank_state, _rank_file(temporary, dist.rank))
    full = _full_model_state(model) if consolidate else None
    dist.barrier()  # every rank's files are in before rank 0 seals the folder

    def seal() -> str:
        _write_model_folder(model.config, full, tokenizer, os.path.join(temporary, "model"))
        state = {"step": step, "world_size": dist.world_size, **trainer_state}
        torch.save(state, os.path.join(temporary, "trainer_state.pt"))
        return ckpt.finish_checkpoint(run_dir, step, temporary)

    return dist.on_main(seal)


def load(dist: Distributed, path: str, model, optimizer, world_size: int | None) -> dict:
    """Restore the sharded student and optimizer of checkpoint `path` in place; returns this
    rank's state (its RNG). world_size: the one the checkpoint was written by."""
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not is_sharded_checkpoint(path):
        raise ckpt.CheckpointError(
            f"{path} was written by a single process; a multi-rank run resumes only from "
            "its own (sharded) checkpoints"
        )
    if world_size != dist.world_size:
        raise ckpt.CheckpointError(
            f"{path} was written by {world_size} ranks; resume it with the same number "
            f"(this run has {dist.world_size})"
        )
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp_load(state, checkpoint_id=os.path.join(path, DCP_DIR))
    except Exception as error:  # DCP raises many kinds on damaged or mismatched shards
        raise ckpt.CheckpointError(f"cannot read {os.path.join(path, DCP_DIR)}: {error}") from None
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
    rank_path = _rank_file(path, dist.rank)
    try:
        return torch.load(rank_path, weights_only=False)
    except Exception as error:
        raise ckpt.CheckpointError(f"cannot read {rank_path}: {error}") from None


def checkpoint_folder(run_dir: str, step: int | None) -> str:
    """Checkpoint `step` of the run (None: the newest intact one), verified."""
    if step is None:
        path = ckpt.latest_checkpoint(run_dir)
        if path is None:
            raise ckpt.CheckpointError(f"{run_dir} holds no intact checkpoint")
        return path
    path = os.path.join(run_dir, "checkpoints", f"step_{step:06d}")
    if not os.path.isdir(path):
        root = os.path.join(run_dir, "checkpoints")
        have = (
            sorted(d for d in os.listdir(root) if d.startswith("step_"))
            if os.path.isdir(root)
            else []
        )
        raise ckpt.CheckpointError(f"{path} does not exist; the run has {have or 'none'}")
    problem = ckpt.verify(path)
    if problem is not None:
        raise ckpt.CheckpointError(f"{path} is damaged: {problem}")
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
    from torch.distributed.checkpoint import load as dcp_load
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    state = model.state_dict()
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.filterwarnings("ignore", message=".*load in a single process")
        dcp_load({"model": state}, checkpoint_id=os.path.join(path, DCP_DIR))
    model.load_state_dict(state)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out
