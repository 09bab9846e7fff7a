"""Loading Hugging Face causal LMs and tokenizers, and checking that student and teacher agree."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA GPU is available")
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


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise ValueError(f"model directory not found: {path}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    path: str, device: torch.device, dtype: torch.dtype, attention: str, trainable: bool
):
    """A causal LM from a local directory (never a hub download)."""
    from transformers import AutoModelForCausalLM

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"not a Hugging Face model directory (no config.json): {path}")
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attention, local_files_only=True
    )
    model.to(device)
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the token -> id map and special tokens: equal fingerprints, same tokenizer."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]),
        "special": {
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
            "pad": tokenizer.pad_token_id,
        },
    }
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def check_tokenizers_match(student_tokenizer, teacher_tokenizer) -> None:
    """Raise ValueError unless both tokenizers map every token to the same id."""
    student_vocab = student_tokenizer.get_vocab()
    teacher_vocab = teacher_tokenizer.get_vocab()
    if student_vocab == teacher_vocab:
        return
    only_student = sorted(set(student_vocab) - set(teacher_vocab))[:5]
    only_teacher = sorted(set(teacher_vocab) - set(student_vocab))[:5]
    remapped = [
        t for t in student_vocab if t in teacher_vocab and student_vocab[t] != teacher_vocab[t]
    ]
    raise ValueError(
        "student and teacher tokenizers differ: "
        f"{len(student_vocab)} vs {len(teacher_vocab)} tokens; only in student: {only_student}; "
        f"only in teacher: {only_teacher}; same token, different id: {remapped[:5]}. "
        "OPD compares distributions over the same vocabulary, so both must use one tokenizer."
    )


def output_rows(model) -> int:
    """Rows of a model's output embedding (its logit columns)."""
    return model.get_output_embeddings().weight.shape[0]


def shared_vocab_size(student_rows: int, teacher_rows: int, tokenizer) -> int:
    """Logit columns both models share, from their output row counts (a remote teacher reports
    its own). Embedding tables are often padded past the tokenizer (e.g. 151,936 vs 152,064):
    that padding is dropped; anything else is an error."""
    shared = min(student_rows, teacher_rows)
    if shared < len(tokenizer):
        raise ValueError(
            f"vocabulary mismatch: the tokenizer has {len(tokenizer)} tokens but the student has "
            f"{student_rows} and the teacher {teacher_rows} output rows"
        )
    return shared


def eos_token_ids(tokenizer, model) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(i for i in ids if i is not None)
