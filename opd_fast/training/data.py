"""Prompt datasets (JSONL / Parquet files, or hf:ORG/NAME[:SPLIT] on the Hub, with a prompt and
an answer column), templates and a resumable sampler."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field

from opd_fast.models.hub import is_dataset_name, resolve_dataset_files


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    source: str = field(default="", compare=False)  # "file:line" (or "file: row N"), for errors


def _example(row, path: str, where: str, columns=("prompt", "answer")) -> Example:
    """One row as an Example; a missing, null or non-text field is an error naming the row.
    A number is a fine answer ("42"); None is not ("None" would be graded as text).
    columns: the names of the prompt and answer fields."""
    prompt_column, answer_column = columns
    if not isinstance(row, dict):
        raise ValueError(
            f"{where}: a row must be an object with '{prompt_column}' and '{answer_column}'"
        )
    for name in columns:
        if name not in row:
            raise ValueError(f"{where}: the row has no '{name}' field (fields: {sorted(row)})")
    prompt = row[prompt_column]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: '{prompt_column}' must be non-empty text, got {prompt!r}")
    answer = row[answer_column]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"{where}: '{answer_column}' must be text or a number, got {answer!r}")
    return Example(prompt=prompt, answer=str(answer), source=where)


def load_examples(
    path: str, prompt_column: str = "prompt", answer_column: str = "answer"
) -> list[Example]:
    """Read prompt and answer rows from .jsonl/.json or .parquet, or from the files of a data
    set on the Hub (hf:ORG/NAME[:SPLIT], through the Hugging Face cache); every error names
    the file and the line (JSONL) or row (Parquet)."""
    columns = (prompt_column, answer_column)
    if is_dataset_name(path):
        examples = []
        for file in resolve_dataset_files(path):
            examples += load_examples(file, *columns)
        return examples
    if not os.path.exists(path):
        raise ValueError(f"dataset not found: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"dataset is not a file: {path}")
    examples = []
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as parquet
        except ImportError as error:
            raise ValueError(f"reading {path} needs pyarrow (pip install pyarrow)") from error
        try:
            rows = parquet.read_table(path).to_pylist()
        except Exception as error:  # pyarrow raises its own types for a damaged file
            raise ValueError(f"{path}: not a readable Parquet file ({error})") from None
        for index, row in enumerate(rows):
            examples.append(_example(row, path, f"{path}: row {index}", columns))
    else:
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                where = f"{path}:{line_number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
                examples.append(_example(row, path, where, columns))
    if not examples:
        raise ValueError(f"dataset is empty: {path}")
    return examples


def check_prompt_lengths(
    examples, template: str, tokenizer, max_new_tokens: int, positions: int | None
) -> int:
    """The longest rendered prompt, in tokens. ValueError naming the first example whose
    prompt plus max_new_tokens does not fit the model's `positions` (beyond them a model
    repeats or invents positions, silently); None: no limit to check."""
    rendered = [render_prompt(example, template, tokenizer) for example in examples]
    encoded = tokenizer(rendered, add_special_tokens=True)["input_ids"]
    for example, ids in zip(examples, encoded):
        length = len(ids)
        if positions and length + max_new_tokens > positions:
            raise ValueError(
                f"{example.source or 'a prompt'}: the prompt is {length} tokens; with "
                f"max_new_tokens={max_new_tokens} it needs {length + max_new_tokens} positions, "
                f"but the model has {positions} (max_position_embeddings)"
            )
    return max((len(ids) for ids in encoded), default=0)


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
