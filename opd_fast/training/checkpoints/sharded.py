"""Checkpoints of a multi-rank run (torch.distributed.checkpoint), with the guarantees of every
checkpoint here (`folders`): written under a temporary name, sealed by a manifest of
checksums, renamed into place, found again by the same scan.

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

import torch

from opd_fast.training.checkpoints import folders
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


class ShardedCheckpointer:
    """The Checkpointer of a multi-rank run (see opd_fast.training.checkpoints): every rank
    calls save and load."""

    def __init__(self, run_dir: str, dist: Distributed):
        self.run_dir, self.dist = run_dir, dist

    def save(self, step, model, optimizer, tokenizer, trainer_state: dict, *, final: bool) -> str:
        """Checkpoint `step`; `final` (the run's end) also writes the consolidated weights into
        model/, a folder transformers loads. Returns the step folder."""
        from torch.distributed.checkpoint import save as dcp_save
        from torch.distributed.checkpoint.state_dict import get_state_dict

        dist, run_dir = self.dist, self.run_dir
        temporary = dist.on_main(lambda: folders.begin_checkpoint(run_dir, step))
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp_save(
            {"model": model_state, "optimizer": optimizer_state},
            checkpoint_id=os.path.join(temporary, DCP_DIR),
        )
        torch.save({"rng": folders.rng_state()}, _rank_file(temporary, dist.rank))
        full = _full_model_state(model) if final else None
        dist.barrier()  # every rank's files are in before rank 0 seals the folder

        def seal() -> str:
            _write_model_folder(model.config, full, tokenizer, os.path.join(temporary, "model"))
            folders.write_trainer_state(
                temporary, step, {"world_size": dist.world_size, **trainer_state}
            )
            return folders.finish_checkpoint(run_dir, step, temporary)

        return dist.on_main(seal)

    def load(self, path: str, model, optimizer) -> dict:
        """Restore the sharded student and AdamW of `path` in place; returns the trainer state
        with this rank's own RNG state. The run must have the world size that wrote it."""
        from torch.distributed.checkpoint import load as dcp_load
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        dist = self.dist
        state = folders.read_trainer_state(path)
        if not is_sharded_checkpoint(path):
            raise folders.CheckpointError(
                f"{path} was written by a single process; a multi-rank run resumes only from "
                "its own (sharded) checkpoints"
            )
        world_size = state.get("world_size")
        if world_size != dist.world_size:
            raise folders.CheckpointError(
                f"{path} was written by {world_size} ranks; resume it with the same number "
                f"(this run has {dist.world_size})"
            )
        model_state, optimizer_state = get_state_dict(model, optimizer)
        sharded = {"model": model_state, "optimizer": optimizer_state}
        try:
            dcp_load(sharded, checkpoint_id=os.path.join(path, DCP_DIR))
        except Exception as error:  # DCP raises many kinds on damaged or mismatched shards
            raise folders.CheckpointError(
                f"cannot read {os.path.join(path, DCP_DIR)}: {error}"
            ) from None
        set_state_dict(
            model,
            optimizer,
            model_state_dict=sharded["model"],
            optim_state_dict=sharded["optimizer"],
        )
        rank_path = _rank_file(path, dist.rank)
        try:
            rank_state = torch.load(rank_path, weights_only=False)
        except Exception as error:
            raise folders.CheckpointError(f"cannot read {rank_path}: {error}") from None
        return {**state, **rank_state}
