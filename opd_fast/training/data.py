"""Prompt datasets (JSONL / Parquet with prompt and answer), templates and a resumable sampler."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


def load_examples(path: str) -> list[Example]:
    """Read {"prompt", "answer"} rows from .jsonl/.json or .parquet; errors name the problem."""
    if not os.path.exists(path):
        raise ValueError(f"dataset not found: {path}")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as parquet
        except ImportError as error:
            raise ValueError(f"reading {path} needs pyarrow (pip install pyarrow)") from error
        rows = parquet.read_table(path).to_pylist()
    else:
        rows = []
        with open(path) as handle:
            for line_number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{line_number}: not valid JSON ({error})") from error
    examples = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or "prompt" not in row or "answer" not in row:
            raise ValueError(f"{path}: row {index} needs 'prompt' and 'answer' fields")
        examples.append(Example(prompt=str(row["prompt"]), answer=str(row["answer"])))
    if not examples:
        raise ValueError(f"dataset is empty: {path}")
    return examples


def render_prompt(example: Example, template: str, tokenizer) -> str:
    """Apply the prompt template: "chat" uses the tokenizer's chat template, otherwise a
    format string with {prompt}."""
    if template == "chat":
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("prompt_template='chat' but the tokenizer has no chat template")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": example.prompt}],
            tokenize=False,
            add_generation_prompt=True,
        )
    try:
        return template.format(prompt=example.prompt)
    except (KeyError, IndexError) as error:
        raise ValueError(f"prompt_template {template!r} must only use {{prompt}}") from error


class PromptSampler:
    """Draws prompts without replacement, reshuffling each epoch; its state is two ints,
    so a checkpoint can resume the exact same stream."""

    def __init__(self, examples: list[Example], seed: int):
        self.examples = examples
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, count: int) -> list[Example]:
        batch = []
        while len(batch) < count:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._shuffled(self.epoch)
            batch.append(self.examples[self._order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._shuffled(self.epoch)
