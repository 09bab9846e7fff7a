"""Prompt datasets (JSONL / Parquet files, or hf:ORG/NAME[:SPLIT] on the Hub, with a prompt and
an answer column), templates and a resumable sampler."""

from __future__ import annotations

import json
import math
import os
import random
import stat
from dataclasses import dataclass, field

from opd_fast.models.hub import is_dataset_name, resolve_dataset_files


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    source: str = field(default="", compare=False)  # "file:line" (or "file: row N"), for errors
    teacher: str | None = None  # the teacher this prompt goes to (several teachers; None: default)


def _example(row, path: str, where: str, columns=("prompt", "answer", None)) -> Example:
    """One row as an Example; a missing, null or non-text field is an error naming the row.
    A number is a fine answer ("42"); None is not ("None" would be graded as text).
    columns: the names of the prompt, answer and (None: not read) teacher fields; a row
    without a teacher field, or with null there, goes to the default teacher."""
    prompt_column, answer_column, teacher_column = columns
    if not isinstance(row, dict):
        raise ValueError(
            f"{where}: a row must be an object with '{prompt_column}' and '{answer_column}'"
        )
    for name in (prompt_column, answer_column):
        if name not in row:
            raise ValueError(f"{where}: the row has no '{name}' field (fields: {sorted(row)})")
    prompt = row[prompt_column]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: '{prompt_column}' must be non-empty text, got {prompt!r}")
    answer = row[answer_column]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"{where}: '{answer_column}' must be text or a number, got {answer!r}")
    if isinstance(answer, float) and not math.isfinite(answer):  # JSON's NaN would grade as "nan"
        raise ValueError(f"{where}: '{answer_column}' must be a finite number, got {answer!r}")
    if isinstance(answer, str) and not answer.strip():
        raise ValueError(f"{where}: '{answer_column}' must be non-empty text, got {answer!r}")
    teacher = row.get(teacher_column) if teacher_column is not None else None
    if teacher is not None and (not isinstance(teacher, str) or not teacher.strip()):
        raise ValueError(f"{where}: '{teacher_column}' must name a teacher, got {teacher!r}")
    return Example(prompt=prompt, answer=str(answer), source=where, teacher=teacher)


def file_kind(path: str) -> str | None:
    """None for a regular file (or a link to one), else what `path` is instead ("a folder",
    "a FIFO (named pipe)", ...): reading a device or a FIFO may never end."""
    mode = os.stat(path).st_mode
    for test, kind in (
        (stat.S_ISREG, None),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def _decode(raw: bytes, where: str, first: bool) -> str:
    """One line of a JSONL file as text; ValueError naming the line and the byte otherwise.
    A UTF-8 byte-order mark at the file's start is allowed."""
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as error:
        hint = ""
        if first and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
            hint = "; the file starts with a UTF-16 byte-order mark: save it as UTF-8"
        raise ValueError(
            f"{where}: not valid UTF-8 (byte 0x{raw[error.start]:02x} at byte {error.start + 1} "
            f"of the line){hint}"
        ) from None


def _parquet_rows(path: str) -> list:
    """The rows of a Parquet file; a value that is not valid UTF-8 is named by row and column."""
    try:
        import pyarrow.parquet as parquet
    except ImportError as error:
        raise ValueError(f"reading {path} needs pyarrow (pip install pyarrow)") from error
    try:
        table = parquet.read_table(path)
    except Exception as error:  # pyarrow raises its own types for a damaged file
        raise ValueError(f"{path}: not a readable Parquet file ({error})") from None
    try:
        return table.to_pylist()
    except UnicodeDecodeError:
        pass  # find the row: only a damaged file pays for the row-by-row pass
    for name in table.column_names:
        column = table.column(name)
        for index in range(len(column)):
            try:
                column[index].as_py()
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path}: row {index}: '{name}' is not valid UTF-8 (byte "
                    f"0x{error.object[error.start]:02x} at byte {error.start + 1})"
                ) from None
    raise ValueError(f"{path}: not valid UTF-8")  # to_pylist failed, no single value does


def load_examples(
    path: str,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    teacher_column: str | None = None,
) -> list[Example]:
    """Read prompt and answer rows from .jsonl/.json or .parquet, or from the files of a data
    set on the Hub (hf:ORG/NAME[/CONFIG][:SPLIT], through the Hugging Face cache); every error
    names the file and the line (JSONL) or row (Parquet)."""
    columns = (prompt_column, answer_column, teacher_column)
    if is_dataset_name(path):
        examples = []
        for file in resolve_dataset_files(path):
            examples += load_examples(file, *columns)
        return examples
    if not os.path.exists(path):
        raise ValueError(f"dataset not found: {path}")
    kind = file_kind(path)
    if kind is not None:
        raise ValueError(f"dataset must be a JSONL or Parquet file, not {kind}: {path}")
    examples = []
    if path.endswith(".parquet"):
        for index, row in enumerate(_parquet_rows(path)):
            examples.append(_example(row, path, f"{path}: row {index}", columns))
    else:
        with open(path, "rb") as handle:
            for line_number, raw in enumerate(handle, 1):
                if not raw.strip():
                    continue
                where = f"{path}:{line_number}"
                line = _decode(raw, where, first=line_number == 1)
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    hint = " (the line holds NUL bytes: UTF-16? save it as UTF-8)"
                    raise ValueError(
                        f"{where}: not valid JSON ({error.msg}){hint if chr(0) in line else ''}"
                    ) from None
                examples.append(_example(row, path, where, columns))
    if not examples:
        raise ValueError(f"dataset is empty: {path}")
    return examples


def check_prompt_lengths(
    examples, template: str, tokenizer, max_new_tokens: int, positions: int | None
) -> int:
    """The longest rendered prompt, in tokens. ValueError naming the first example whose
    prompt plus max_new_tokens does not fit the model's `positions` (beyond them a model
    repeats or invents positions, silently); None: no limit to check.

    The work is bounded whatever the data: a prompt longer in characters than `positions`
    tokens of the tokenizer's longest entry can hold is refused without tokenizing it (BPE
    tokenizers, where a token never covers more characters than its entry), and a long one
    is tokenized a piece at a time, stopping once it is over the limit."""
    rendered = [render_prompt(example, template, tokenizer) for example in examples]
    if positions:
        budget = positions - max_new_tokens  # prompt tokens that fit
        if budget < 1:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                f"{positions} positions (max_position_embeddings)"
            )
        longest_entry = _longest_token_chars(tokenizer)
        for example, text in zip(examples, rendered):
            if longest_entry is not None and len(text) > budget * longest_entry:
                raise ValueError(
                    f"{example.source or 'a prompt'}: the prompt has {len(text)} characters; "
                    f"with max_new_tokens={max_new_tokens} the model's {positions} positions "
                    f"(max_position_embeddings) leave {budget} tokens for it, at most "
                    f"{budget * longest_entry} characters (the tokenizer's longest "
                    f"entry has {longest_entry})"
                )
            if len(text) > _PIECE_TOKENS * budget:
                at_least = _tokens_beyond(tokenizer, text, budget)
                if at_least is not None:
                    raise ValueError(
                        f"{example.source or 'a prompt'}: the prompt is at least {at_least} "
                        f"tokens ({len(text)} characters, counted until over the limit); with "
                        f"max_new_tokens={max_new_tokens} it needs at least "
                        f"{at_least + max_new_tokens} positions, but the model has {positions} "
                        "(max_position_embeddings)"
                    )
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


# Characters per token a piece of a long prompt is cut at (no real text has more); a prompt
# longer than this many characters per token of its budget is counted piece by piece.
_PIECE_TOKENS = 16


def _longest_token_chars(tokenizer) -> int | None:
    """The most characters one token of `tokenizer` can cover, when that is bounded: a BPE
    model's tokens are its vocabulary entries (bytes, or characters with a marker for the
    space), so none covers more characters than the longest entry. None for other models (a
    word-level or WordPiece unknown token stands for a word of any length) and slow ones."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "BPE":
        return None
    return max(map(len, tokenizer.get_vocab()), default=0) or None


def _tokens_beyond(tokenizer, text: str, budget: int) -> int | None:
    """A lower bound on the tokens of `text` once it exceeds `budget`, found by tokenizing
    pieces of _PIECE_TOKENS * budget characters (cut at a space), stopping at the first bound
    over `budget`; None when the whole text is counted and stays within it. A cut can add a
    token (a split word), so each piece's count is taken one lower."""
    piece = _PIECE_TOKENS * budget
    counted, start = 0, 0
    while start < len(text):
        end = min(start + piece, len(text))
        if end < len(text):
            space = text.rfind(" ", start + piece // 2, end)
            end = space if space > start else end
        tokens = len(tokenizer(text[start:end], add_special_tokens=False)["input_ids"])
        counted += max(tokens - 1, 0)
        if counted > budget:
            return counted
        start = end
    return None


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
    if template == "{prompt}":  # the default: no copy of a long prompt
        return example.prompt
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
