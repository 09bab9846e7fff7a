"""Tiny Qwen3 models of the toy world: configs, training, quick evaluation.

Everything runs on the CPU in float32 and is deterministic for a given seed, torch build and
thread count (the build pins the thread count, see `BUILD_THREADS`).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator

import torch

from opd_fast.toy.spec import ArchSpec, TrainSpec

# Threads used while building: fixed so that a rebuild reproduces the same weights (float
# reductions depend on the thread count). One thread: these models are too small to gain much
# from more, and a multi-threaded build slows down many-fold when other processes share the CPU.
BUILD_THREADS = int(os.environ.get("OPD_FAST_TOY_THREADS", "1"))


@contextlib.contextmanager
def build_context(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG and pin the thread count, restoring both afterwards."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(BUILD_THREADS)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def make_config(arch: ArchSpec, tokenizer):
    """A Qwen3 config for `arch` over the tokenizer's vocabulary."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )


def new_model(arch: ArchSpec, tokenizer, seed: int):
    """A randomly initialised Qwen3ForCausalLM (float32, CPU), initialised from `seed`."""
    from transformers import GenerationConfig, Qwen3ForCausalLM

    with build_context(seed):
        model = Qwen3ForCausalLM(make_config(arch, tokenizer))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def encode_examples(tokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [n, L] (<bos> prompt response <eos>, right-padded) and labels (-100 outside
    the response and on padding). Maps words straight through the word-level vocabulary
    (what the tokenizer does, minus its per-call overhead)."""
    vocab = tokenizer.get_vocab()

    def ids_of(text: str) -> list[int]:
        try:
            return [vocab[word] for word in text.split()]
        except KeyError as error:
            raise ValueError(f"word {error.args[0]!r} is not in the toy vocabulary") from None

    rows, starts = [], []
    for prompt, response in pairs:
        prompt_ids = [tokenizer.bos_token_id] + ids_of(prompt)
        rows.append(prompt_ids + ids_of(response) + [tokenizer.eos_token_id])
        starts.append(len(prompt_ids))
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for index, (row, start) in enumerate(zip(rows, starts)):
        ids[index, : len(row)] = torch.tensor(row)
        labels[index, start : len(row)] = ids[index, start : len(row)]
    return ids, labels


def _lr_factor(step: int, train: TrainSpec) -> float:
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_model(
    model,
    ids: torch.Tensor,
    labels: torch.Tensor,
    train: TrainSpec,
    seed: int,
    progress: bool = True,
    description: str = "toy model",
) -> float:
    """Train in place with AdamW on consecutive batches of (ids, labels), cycling if they run
    out; returns the final loss (mean of the last 10 steps)."""
    from tqdm.auto import tqdm

    recent: list[float] = []
    with build_context(seed):
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
        other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
        groups = [
            {"params": decay, "weight_decay": train.weight_decay},
            {"params": other, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=train.lr, betas=(0.9, 0.98))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, train))
        model.train()
        bar = tqdm(range(train.steps), desc=description, disable=not progress, leave=False)
        for step in bar:
            start = (step * train.batch_size) % len(ids)
            batch = slice(start, start + train.batch_size)
            # Right padding sits after every real token, so causal attention never sees it
            # and the labels mask it out of the loss: no attention mask needed.
            loss = model(input_ids=ids[batch], labels=labels[batch]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
            optimizer.step()
            scheduler.step()
            recent = (recent + [loss.item()])[-10:]
            bar.set_postfix(loss=f"{recent[-1]:.4f}", refresh=False)
        bar.close()
    model.eval()
    return sum(recent) / len(recent)


_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def extract_boxed(text: str) -> str | None:
    """Whitespace-stripped content of the last \\boxed{...} in `text`, or None (toy-internal)."""
    found = _BOXED.findall(text)
    return re.sub(r"\s+", "", found[-1]) if found else None


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
) -> list[str]:
    """Responses (decoded, special tokens dropped): greedy when temperature == 0, else sampled."""
    responses: list[str] = []
    with build_context(seed):
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(
                prompts[start : start + batch_size], return_tensors="pt", padding=True
            )
            sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
            out = model.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **(sampling if temperature > 0 else {"do_sample": False}),
            )
            new = out[:, batch.input_ids.shape[1] :]
            responses += tokenizer.batch_decode(new, skip_special_tokens=True)
    return responses


def accuracy_report(rows: list[dict], responses: list[str]) -> dict[str, float]:
    """Accuracy overall and split by whether the student knows the entity."""

    def mean(flags: list[bool]) -> float:
        return round(sum(flags) / len(flags), 4) if flags else float("nan")

    correct = [extract_boxed(r) == row["answer"] for row, r in zip(rows, responses)]
    known = [c for c, row in zip(correct, rows) if row["student_knows"]]
    unknown = [c for c, row in zip(correct, rows) if not row["student_knows"]]
    boxed = [extract_boxed(r) is not None for r in responses]
    return {
        "all": mean(correct),
        "student_known": mean(known),
        "student_unknown": mean(unknown),
        "boxed_rate": mean(boxed),
    }


def evaluate(model, tokenizer, rows: list[dict], seed: int) -> dict[str, dict[str, float]]:
    """Greedy and T=1 sampled accuracy on `rows` ({"prompt", "answer", "student_knows"})."""
    prompts = [row["prompt"] for row in rows]
    return {
        "greedy": accuracy_report(rows, generate(model, tokenizer, prompts)),
        "sample_t1": accuracy_report(
            rows, generate(model, tokenizer, prompts, temperature=1.0, seed=seed)
        ),
    }


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
