"""Tiny randomly initialised Hugging Face models and prompt files, for tests and smoke runs of
your own (a public utility: README.md, "Tiny models for smoke tests").

Nothing is downloaded: configs are written from scratch (Qwen3 or Llama), weights come from a
seed, and the tokenizer is the toy world's word-level one.
"""

from __future__ import annotations

import json
import os

import torch

from opd_fast.toy.spec import ToyWorldSpec
from opd_fast.toy.tokenizer import build_tokenizer


def tiny_tokenizer():
    return build_tokenizer(ToyWorldSpec())


def save_tiny_model(
    path: str,
    *,
    family: str = "qwen3",
    vocab_size: int | None = None,
    hidden_size: int = 32,
    num_layers: int = 1,
    seed: int = 0,
    tokenizer=None,
) -> str:
    """Write a random tiny causal LM plus tokenizer into `path`; vocab_size may exceed the
    tokenizer's (padded embedding tables, as real checkpoints have)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    tokenizer = tokenizer or tiny_tokenizer()
    common = dict(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    if family == "qwen3":
        config, model_class = Qwen3Config(head_dim=hidden_size // 2, **common), Qwen3ForCausalLM
    elif family == "llama":
        config, model_class = LlamaConfig(**common), LlamaForCausalLM
    else:
        raise ValueError(f"unknown family {family!r}; expected qwen3 or llama")
    torch.manual_seed(seed)
    model = model_class(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def write_prompts(path: str, count: int = 16, seed: int = 0) -> str:
    """A JSONL file of toy-style prompts with answers."""
    generator = torch.Generator().manual_seed(seed)
    with open(path, "w") as handle:
        for _ in range(count):
            entity, operand = torch.randint(0, 50, (2,), generator=generator).tolist()
            operand %= 10
            handle.write(
                json.dumps(
                    {"prompt": f"what is e{entity:03d} plus {operand} ?", "answer": str(operand)}
                )
                + "\n"
            )
    return path


def tiny_setup(folder: str, family: str = "qwen3", teacher_vocab_padding: int = 0) -> dict:
    """Student + teacher dirs and prompt files under `folder`, as TrainConfig keys."""
    os.makedirs(folder, exist_ok=True)
    tokenizer = tiny_tokenizer()
    student = save_tiny_model(
        os.path.join(folder, "student"), family=family, seed=1, tokenizer=tokenizer
    )
    teacher = save_tiny_model(
        os.path.join(folder, "teacher"),
        family=family,
        seed=2,
        hidden_size=48,
        vocab_size=len(tokenizer) + teacher_vocab_padding,
        tokenizer=tokenizer,
    )
    prompts = write_prompts(os.path.join(folder, "prompts.jsonl"))
    return {"student": student, "teacher": teacher, "train_data": prompts, "eval_data": prompts}
