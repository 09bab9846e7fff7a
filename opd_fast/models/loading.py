"""Loading Hugging Face causal LMs and tokenizers from local directories (never a download):
where they run (device, dtype, attention kernel) and how they are loaded."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but no CUDA GPU is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} requested but only {torch.cuda.device_count()} GPU(s) exist"
            )
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_attention(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


@dataclass(frozen=True)
class Placement:
    """Where and how models run: the device, the dtype of their weights and logits, and the
    attention kernel ("auto" resolved: flash-attention 2 on CUDA when installed, else SDPA)."""

    device: torch.device
    dtype: torch.dtype
    attention: str

    @classmethod
    def resolve(cls, device: str = "auto", dtype: str = "auto", attention: str = "auto"):
        """From config values: "auto" is bf16 on CUDA, fp32 on CPU."""
        resolved = resolve_device(device)
        return cls(resolved, resolve_dtype(dtype, resolved), resolve_attention(attention, resolved))


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise ValueError(f"model directory not found: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"not a Hugging Face model directory (no config.json): {path}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:  # no tokenizer files, or ones it cannot read
        raise ValueError(f"cannot load a tokenizer from {path}: {error}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def checkpoint_bytes(path: str) -> int:
    """The bytes of a model folder's weight files (safetensors, else PyTorch .bin): what its
    parameters take in the dtype they were saved in, known before loading them."""
    names = os.listdir(path) if os.path.isdir(path) else []
    weights = [n for n in names if n.endswith(".safetensors")] or [
        n for n in names if n.endswith(".bin")
    ]
    return sum(os.path.getsize(os.path.join(path, name)) for name in weights)


def activation_checkpointing_reason(path: str) -> str | None:
    """Why the model at `path` cannot checkpoint its layers' activations (None: it can), from
    its config alone, before any weight loads."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return f"transformers has no causal LM for {type(config).__name__}"
    if not getattr(model_class, "supports_gradient_checkpointing", False):
        return f"transformers' {model_class.__name__} does not support gradient checkpointing"
    return None


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward (non-reentrant checkpoints,
    which compose with FSDP2 and the fused loss), instead of keeping them."""
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.x on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def load_model(path: str, placement: Placement, trainable: bool):
    """A causal LM from a local directory (never a hub download); frozen unless trainable."""
    from transformers import AutoModelForCausalLM

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"not a Hugging Face model directory (no config.json): {path}")
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=placement.dtype,
        attn_implementation=placement.attention,
        local_files_only=True,
    )
    model.to(placement.device)
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model


# The toy world, the tests and the benchmarks' CPU runs: fp32 weights, PyTorch's SDPA.
CPU_FP32 = Placement(torch.device("cpu"), torch.float32, "sdpa")
