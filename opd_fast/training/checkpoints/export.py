"""Any checkpoint of a run, single-process or sharded, as a Hugging Face model folder
(safetensors weights, config, tokenizer): what transformers and `opd-fast serve-teacher` load.
"""

from __future__ import annotations

import os
import shutil
import warnings

from opd_fast.training.checkpoints import folders
from opd_fast.training.checkpoints.sharded import DCP_DIR, load_dcp
from opd_fast.training.lora import ADAPTER_DIR


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


def export(run_dir: str, step: int | None, out: str, *, adapter_only: bool = False) -> str:
    """Write checkpoint `step` of the run (None: the newest) as a Hugging Face model folder at
    `out` (safetensors weights, config, tokenizer): what transformers and serve-teacher load.
    Sharded checkpoints are consolidated here, in this one process (no process group).

    A LoRA run's checkpoint (adapters only) is merged into its base model; adapter_only: the
    adapter folder alone (peft.PeftModel.from_pretrained loads it onto the base model)."""
    path = checkpoint_folder(run_dir, step)
    model_dir = os.path.join(path, "model")
    if os.path.exists(out) and os.listdir(out):
        raise ValueError(f"export: {out} exists and is not empty")
    if os.path.isdir(os.path.join(path, ADAPTER_DIR)):
        return _export_lora(path, out, adapter_only)
    if adapter_only:
        raise ValueError(
            f"export: --adapter-only: {path} is a fully fine-tuned student's checkpoint (the run "
            "had no lora_rank); export the model without it"
        )
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


def _base_model(adapter_dir: str) -> str:
    from opd_fast.training.lora import read_adapter_config

    base = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not base or not os.path.isfile(os.path.join(base, "config.json")):
        raise folders.CheckpointError(
            f"export: the LoRA run's base model ({base!r}, base_model_name_or_path in "
            f"{adapter_dir}/adapter_config.json) is not a model folder here"
        )
    return base


def _export_lora(path: str, out: str, adapter_only: bool) -> str:
    """A LoRA checkpoint merged into its base model at `out`, or (adapter_only) its peft
    adapter folder; a sharded one's adapters are consolidated from its DCP shards first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_fast.training import lora

    adapter_dir = os.path.join(path, ADAPTER_DIR)
    base = _base_model(adapter_dir)
    if os.path.isfile(os.path.join(adapter_dir, lora.ADAPTER_WEIGHTS)):
        state = lora.read_adapter(adapter_dir)
    else:  # a sharded checkpoint before the run's end: the adapters are in dcp/
        peft = lora.import_peft()
        settings = peft.LoraConfig.from_pretrained(adapter_dir)
        model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
        peft.inject_adapter_in_model(settings, model, adapter_name=lora.ADAPTER)
        state = lora.adapter_state(model)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*load in a single process")
            load_dcp({"model": state}, os.path.join(path, DCP_DIR))
    peft = lora.import_peft()
    settings = peft.LoraConfig.from_pretrained(adapter_dir)
    settings.base_model_name_or_path = base
    if adapter_only:
        lora.save_adapter(out, state, settings)
        return out
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
    peft.inject_adapter_in_model(settings, model, adapter_name=lora.ADAPTER)
    missing = set(lora.adapter_state(model)) ^ set(state)
    if missing:
        raise folders.CheckpointError(
            f"export: {adapter_dir} does not match its base model's layers: {sorted(missing)[:4]}"
        )
    model.load_state_dict(state, strict=False)
    merged = AutoModelForCausalLM.from_config(model.config, dtype=next(model.parameters()).dtype)
    merged.load_state_dict(dict(lora.merged_state_items(model)), strict=False)
    merged.tie_weights()
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(os.path.join(path, "model")).save_pretrained(out)
    return out
