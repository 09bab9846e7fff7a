"""LoRA students (config lora_rank > 0), through `peft` (pip install "opd_fast[lora]").

The adapters are injected into the loaded Hugging Face model in place
(peft.inject_adapter_in_model): the model keeps its class, its config, its embeddings and its
output layer, so the fused linear loss path, FSDP2 sharding, activation checkpointing and the
rollout engines see the model they always do. Every base weight is frozen; the optimizer sees
only the adapters (`trainable_parameters`), and checkpoints store only them, as a peft adapter
folder (`save_adapter`: adapter_config.json + adapter_model.safetensors, which
peft.PeftModel.from_pretrained loads onto the base model).

The output layer (and the embeddings it may be tied to) is never adapted: the fused linear
path computes the loss from hidden states and the output weight, which stays the base one.

Engines that hold weights of their own (vLLM, the hf engine's copy when sampling ahead) get the
merged weights under the base model's names (`engine_state_items`: W + alpha/r * B @ A).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch

from opd_fast.training.distributed import full_state_items

ADAPTER = "default"  # the one adapter's name inside the model
ADAPTER_DIR = "adapter"  # a checkpoint's adapter folder
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # how peft names a base model's modules in an adapter file
INSTALL = 'pip install "opd_fast[lora]"'


def import_peft():
    """peft, or ImportError saying how to install it."""
    try:
        import peft
    except ImportError:
        raise ImportError(f"LoRA (lora_rank > 0) needs the peft package: {INSTALL}") from None
    return peft


def peft_available() -> bool:
    try:
        import_peft()
    except ImportError:
        return False
    return True


def lora_config(config, base_path: str | None):
    """The peft LoraConfig of a TrainConfig with lora_rank > 0."""
    peft = import_peft()
    targets = config.lora_target_modules
    return peft.LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        base_model_name_or_path=base_path,
        task_type="CAUSAL_LM",
    )


def _frozen_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The embeddings and the output layer, by module name: never adapted."""
    kept = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m}
    return {name: module for name, module in model.named_modules() if id(module) in kept}


def apply_lora(model: torch.nn.Module, config, base_path: str | None) -> torch.nn.Module:
    """Inject the config's LoRA adapters into `model` in place and freeze everything else;
    ValueError when the targets name the embeddings or the output layer, or nothing."""
    peft = import_peft()
    frozen = _frozen_layers(model)
    settings = lora_config(config, base_path)
    targets = config.lora_target_modules
    if not isinstance(targets, str):
        named = sorted(
            name for name in frozen if any(name == t or name.endswith("." + t) for t in targets)
        )
        if named:
            raise ValueError(
                f"config: lora_target_modules names {named}: the embeddings and the output "
                "layer stay frozen (the fused linear loss uses the base output weight); target "
                "the decoder's linear layers (or all-linear)"
            )
    # The adapters' initial values come from the run's seed alone, the same on every rank (each
    # FSDP2 rank keeps its part of the tensor it made) and the run's random streams untouched.
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        try:
            peft.inject_adapter_in_model(settings, model, adapter_name=ADAPTER)
        except ValueError as error:  # "Target modules ... not found in the base model"
            raise ValueError(f"config: lora_target_modules: {error}") from None
    model.requires_grad_(False)
    for name, parameter in model.named_parameters():
        if is_adapter(name):
            parameter.requires_grad_(True)
    wrapped = [name for name, module in model.named_modules() if name in frozen and
               hasattr(module, "base_layer")]  # fmt: skip
    if wrapped or not trainable_parameters(model):
        raise ValueError(
            f"config: lora_target_modules {targets!r} adapts {wrapped or 'nothing'} in "
            f"{type(model).__name__}; target the decoder's linear layers (or all-linear)"
        )
    return model


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def is_lora(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "peft_config", None))


def lora_settings(model: torch.nn.Module):
    """The LoraConfig the model's adapters were made with."""
    return model.peft_config[ADAPTER]


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Trainable and total parameters (whole sizes, for sharded ones too)."""
    total = trainable = 0
    for parameter in model.parameters():
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    return {"trainable": trainable, "total": total}


# ---- adapter folders (peft's format) ------------------------------------------------------


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors of an unsharded model, by the model's own names."""
    return {name: tensor for name, tensor in model.state_dict().items() if is_adapter(name)}


def to_peft_name(name: str) -> str:
    return PEFT_PREFIX + name.replace(f".{ADAPTER}.", ".")


def from_peft_name(name: str) -> str:
    name = name.removeprefix(PEFT_PREFIX)
    for part in (".lora_A.", ".lora_B."):
        name = name.replace(part, f"{part}{ADAPTER}.")
    return name


def save_adapter(folder: str, state: dict[str, torch.Tensor] | None, settings) -> None:
    """adapter_config.json and (when `state` is given: the adapters by the model's names)
    adapter_model.safetensors, as peft writes them."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    settings.save_pretrained(folder)
    if state is not None:
        tensors = {
            to_peft_name(name): tensor.detach().cpu().contiguous() for name, tensor in state.items()
        }
        save_file(tensors, os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})


def read_adapter(folder: str) -> dict[str, torch.Tensor]:
    """An adapter folder's tensors by the model's own names; ValueError naming the file."""
    from safetensors.torch import load_file

    path = os.path.join(folder, ADAPTER_WEIGHTS)
    try:
        tensors = load_file(path)
    except Exception as error:  # safetensors raises its own kinds on a damaged file
        raise ValueError(f"cannot read {path}: {error}") from None
    return {from_peft_name(name): tensor for name, tensor in tensors.items()}


def read_adapter_config(folder: str) -> dict:
    with open(os.path.join(folder, ADAPTER_CONFIG)) as handle:
        return json.load(handle)


def load_adapter(model: torch.nn.Module, folder: str) -> None:
    """Copy an adapter folder's tensors into the (unsharded) LoRA model in place; ValueError
    unless they are exactly its adapters."""
    state = read_adapter(folder)
    wanted = set(adapter_state(model))
    if set(state) != wanted:
        raise ValueError(
            f"adapter {folder} does not match the model's adapters: missing "
            f"{sorted(wanted - set(state))[:4]}, unexpected {sorted(set(state) - wanted)[:4]} "
            "(another lora_rank or lora_target_modules?)"
        )
    model.load_state_dict(state, strict=False)


# ---- merged weights, for the engines ------------------------------------------------------


def merged_state_items(
    model: torch.nn.Module, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the LoRA model's merged weights under the base model's state_dict
    names (X.base_layer.weight + alpha/r * X.lora_B @ X.lora_A as X.weight), in `dtype`; a
    sharded model is gathered a unit at a time (distributed.full_state_items), each adapted
    weight held until its three parts have come."""
    settings = lora_settings(model)
    scale = settings.lora_alpha / settings.r
    if getattr(settings, "use_rslora", False):
        scale = settings.lora_alpha / settings.r**0.5
    pending: dict[str, dict[str, torch.Tensor]] = {}
    parts = {
        ".base_layer.weight": "weight",
        f".lora_A.{ADAPTER}.weight": "A",
        f".lora_B.{ADAPTER}.weight": "B",
    }
    for name, tensor in full_state_items(model):
        part = next((p for p in parts if name.endswith(p)), None)
        if part is None:
            name = name.replace(".base_layer.", ".")  # an adapted layer's bias
            yield name, tensor if dtype in (None, tensor.dtype) else tensor.to(dtype)
            continue
        prefix = name[: -len(part)]
        held = pending.setdefault(prefix, {})
        held[parts[part]] = tensor
        if len(held) == 3:
            del pending[prefix]
            weight = held["weight"].float() + scale * (held["B"].float() @ held["A"].float())
            yield f"{prefix}.weight", weight.to(dtype or held["weight"].dtype)
    if pending:
        raise RuntimeError(f"merged weights: incomplete adapted layers {sorted(pending)[:4]}")


def engine_state_items(
    model: torch.nn.Module, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """What an engine holding its own weights loads: the model's state, merged for LoRA."""
    if is_lora(model):
        return merged_state_items(model, dtype)
    return full_state_items(model, dtype)
