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
