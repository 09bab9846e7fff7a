"""Checkpoints of a single-process run: the student's weights as a Hugging Face folder
(safetensors) plus everything needed to resume exactly (trainer_state.safetensors: optimizer,
scheduler, sampler, RNG, metrics count, config; metrics.jsonl: the run's records so far), in a
sealed step folder (`folders`).

Layout: <run_dir>/checkpoints/step_000050/{model/, trainer_state.safetensors, metrics.jsonl,
manifest.json} (format 1, still read: trainer_state.pt and no metrics.jsonl). A LoRA run's
(opd_fast.training.lora) holds the adapters alone, as a peft folder adapter/, and model/ only
the config and tokenizer.
"""

from __future__ import annotations

import os

import torch

from opd_fast.training.checkpoints.folders import (
    CheckpointError,
    begin_checkpoint,
    check_lora_match,
    fault,
    finish_checkpoint,
    read_trainer_state,
    rng_state,
    save_size,
    saving,
    write_trainer_state,
)
from opd_fast.training.checkpoints.sharded import is_sharded_checkpoint
from opd_fast.training.lora import (
    ADAPTER_DIR,
    adapter_state,
    is_lora,
    load_adapter,
    lora_settings,
    save_adapter,
)


class SingleProcessCheckpointer:
    """The Checkpointer of a run without a process group (see opd_fast.training.checkpoints)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir

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
        """Write checkpoint `step` (verified, atomically) and name it in `latest`; returns its
        directory. The whole model is in every checkpoint, so `final` changes nothing. A file
        system that refuses it raises CheckpointSaveError (folders.saving)."""
        with saving(self.run_dir, step, save_size(self.run_dir, model, optimizer)):
            temporary = begin_checkpoint(self.run_dir, step)
            if is_lora(model):  # the adapters alone; model/ keeps the config and tokenizer
                save_adapter(
                    os.path.join(temporary, ADAPTER_DIR), adapter_state(model), lora_settings(model)
                )
                model.config.save_pretrained(os.path.join(temporary, "model"))
            else:
                model.save_pretrained(os.path.join(temporary, "model"), safe_serialization=True)
            tokenizer.save_pretrained(os.path.join(temporary, "model"))
            fault("weights")
            state = {**trainer_state, "optimizer": optimizer.state_dict(), "rng": rng_state()}
            write_trainer_state(temporary, step, state, metrics_lines)
            fault("state")
            return finish_checkpoint(self.run_dir, step, temporary)

    def load(self, path: str, model, optimizer) -> dict:
        """Restore the student and AdamW of checkpoint `path` in place; its trainer state."""
        state = read_trainer_state(path)
        if is_sharded_checkpoint(path):
            raise CheckpointError(
                f"{path} was written by a multi-rank run; resume it under torchrun with "
                f"{state.get('world_size')} ranks (or export it: opd-fast export)"
            )
        check_lora_match(path, is_lora(model))
        if is_lora(model):
            try:
                load_adapter(model, os.path.join(path, ADAPTER_DIR))
            except ValueError as error:
                raise CheckpointError(str(error)) from None
        else:
            load_weights(model, os.path.join(path, "model"))
        optimizer.load_state_dict(state["optimizer"])
        return state


def load_weights(model: torch.nn.Module, model_dir: str) -> None:
    """Copy safetensors weights from a checkpoint's model dir into `model` in place."""
    from safetensors.torch import load_file

    state = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            path = os.path.join(model_dir, name)
            try:
                state.update(load_file(path))
            except Exception as error:  # safetensors raises its own kinds on a damaged file
                raise CheckpointError(f"cannot read {path}: {error}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied output embeddings are saved once; anything else missing is a real problem.
    missing = [m for m in missing if "lm_head" not in m]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {model_dir} does not match the model: missing {missing}, "
            f"unexpected {unexpected}"
        )
