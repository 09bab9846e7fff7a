"""Checkpoints of a multi-rank run (torch.distributed.checkpoint), with the guarantees of every
checkpoint here (`folders`): written under a temporary name, sealed by a manifest of
checksums, renamed into place, found again by the same scan.

A sharded step folder holds:
    dcp/                    the student's and AdamW's sharded state (every rank writes its part)
    rank_00000.safetensors  each rank's RNG state (format 1: rank_00000.pt, still read)
    trainer_state.safetensors  rank 0: scheduler, sampler (the data position, the same on
                            every rank), metrics count, config, world size (format 1: .pt)
    metrics.jsonl           rank 0: the run's records up to this step
    model/                  config and tokenizer; at the run's end also the consolidated
                            safetensors weights (a folder transformers loads)
    adapter/                a LoRA run's instead (its dcp/ holds the adapters alone): the peft
                            adapter_config.json, and at the run's end the consolidated
                            adapter_model.safetensors
    manifest.json           written last, by rank 0, after every rank's files are in

Nothing in it is unpickled when it loads: the rank and trainer state files are safetensors +
JSON (state_format), and DCP's metadata is read allowing only its own classes.
"""

from __future__ import annotations

import os

import torch

from opd_fast.training.checkpoints import folders, state_format
from opd_fast.training.distributed import Distributed

DCP_DIR = "dcp"


def _rank_file(folder: str, rank: int, legacy: bool = False) -> str:
    return os.path.join(folder, f"rank_{rank:05d}.{'pt' if legacy else 'safetensors'}")


def load_dcp(state: dict, checkpoint_dir: str) -> None:
    """torch.distributed.checkpoint.load of `checkpoint_dir` into `state` in place, its
    metadata read without running code (state_format.safe_dcp_reader); CheckpointError naming
    the folder on a damaged, mismatched or refused one."""
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        dcp_load(state, storage_reader=state_format.safe_dcp_reader(checkpoint_dir))
    except (Exception, CheckpointException) as error:  # many kinds on damaged or other shards
        detail = state_format.dcp_failure(error)
        raise folders.CheckpointError(f"cannot read {checkpoint_dir}: {detail}") from None


def is_sharded_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, DCP_DIR))


def _full_model_state(model) -> dict[str, torch.Tensor]:
    """The unsharded weights on rank 0's CPU (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def _state_options(model):
    """A LoRA run's DCP state holds the trainable parameters (the adapters) alone (`_kept`:
    a frozen output layer tied to the frozen embeddings still comes with them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    from opd_fast.training.lora import is_lora

    lora = is_lora(model)
    return StateDictOptions(ignore_frozen_params=lora, strict=not lora)


def _kept(model, state: dict) -> dict:
    from opd_fast.training.lora import is_adapter, is_lora

    if not is_lora(model):
        return state
    return {name: tensor for name, tensor in state.items() if is_adapter(name)}


def _full_adapter_state(model) -> dict[str, torch.Tensor]:
    """A LoRA model's adapters, unsharded on rank 0's CPU (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return _kept(model, get_model_state_dict(model, options=options))


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

    def save(
        self,
        step,
        model,
        optimizer,
        tokenizer,
        trainer_state: dict,
        *,
        final: bool,
        metrics_lines: list[str] | None = None,
    ) -> str:
        """Checkpoint `step`; `final` (the run's end) also writes the consolidated weights into
        model/, a folder transformers loads. Returns the step folder. A file system that
        refuses it raises CheckpointSaveError (folders.saving) on the rank it refused."""
        from torch.distributed.checkpoint import save as dcp_save
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from opd_fast.training.lora import ADAPTER_DIR, is_lora, lora_settings, save_adapter

        dist, run_dir = self.dist, self.run_dir
        lora = is_lora(model)
        with folders.saving(run_dir, step, folders.save_size(run_dir, model, optimizer)):
            temporary = dist.on_main(lambda: folders.begin_checkpoint(run_dir, step))
            model_state, optimizer_state = get_state_dict(
                model, optimizer, options=_state_options(model)
            )
            model_state = _kept(model, model_state)
            dcp_save(
                {"model": model_state, "optimizer": optimizer_state},
                checkpoint_id=os.path.join(temporary, DCP_DIR),
            )
            state_format.save_state(_rank_file(temporary, dist.rank), {"rng": folders.rng_state()})
            full = None
            if final:
                full = _full_adapter_state(model) if lora else _full_model_state(model)
            dist.barrier()  # every rank's files are in before rank 0 seals the folder

            def seal() -> str:
                model_dir = os.path.join(temporary, "model")
                if lora:  # adapter_config.json always, the adapters' weights at the end
                    save_adapter(os.path.join(temporary, ADAPTER_DIR), full, lora_settings(model))
                    full_weights = None
                else:
                    full_weights = full
                _write_model_folder(model.config, full_weights, tokenizer, model_dir)
                folders.write_trainer_state(
                    temporary, step, {"world_size": dist.world_size, **trainer_state}, metrics_lines
                )
                return folders.finish_checkpoint(run_dir, step, temporary)

            return dist.on_main(seal)

    def load(self, path: str, model, optimizer) -> dict:
        """Restore the sharded student and AdamW of `path` in place; returns the trainer state
        with this rank's own RNG state. The run must have the world size that wrote it."""
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
        from opd_fast.training.lora import is_lora

        folders.check_lora_match(path, is_lora(model))
        options = _state_options(model)
        model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
        sharded = {"model": _kept(model, model_state), "optimizer": optimizer_state}
        load_dcp(sharded, os.path.join(path, DCP_DIR))
        set_state_dict(
            model,
            optimizer,
            model_state_dict=sharded["model"],
            optim_state_dict=sharded["optimizer"],
            options=options,
        )
        rank_path = _rank_file(path, dist.rank)
        try:
            if os.path.isfile(rank_path):
                rank_state = state_format.load_state(rank_path)
            else:  # format 1
                rank_state = state_format.load_legacy(_rank_file(path, dist.rank, legacy=True))
        except state_format.StateFormatError as error:
            raise folders.CheckpointError(str(error)) from None
        if not isinstance(rank_state, dict) or "rng" not in rank_state:
            raise folders.CheckpointError(f"{rank_path} holds no RNG state")
        return {**state, "rng": rank_state["rng"]}
