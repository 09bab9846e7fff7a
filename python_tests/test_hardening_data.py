"""Odd data gets a named error, and the prompt-length check bounds its work (issue 23, item 4):
undecodable bytes name the file and line (or Parquet row), NaN and empty answers are refused,
a device or a FIFO as train_data is named as such, and a 50 MB single-line prompt is refused in
seconds with bounded memory instead of being tokenized whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from opd_fast.toy.tiny import tiny_setup
from opd_fast.training import data as data_module
from opd_fast.training.config import make_config
from opd_fast.training.data import Example, check_prompt_lengths, load_examples


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from opd_fast.models.loading import load_tokenizer

    return load_tokenizer(tiny["student"])


# ---- decoding ---------------------------------------------------------------------------


def test_invalid_utf8_names_the_file_line_and_byte(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "1+1?", "answer": 2}\n{"prompt": "\xc5x", "answer": 1}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: not valid UTF-8 \(byte 0xc5 at byte 13 "):
        load_examples(str(path))


def test_utf16_file_is_named_as_such(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes('{"prompt": "1+1?", "answer": 2}\n'.encode("utf-16"))
    with pytest.raises(ValueError, match=rf"{path}:1: not valid UTF-8.*UTF-16 byte-order mark"):
        load_examples(str(path))


def test_utf8_byte_order_mark_is_allowed(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "1+1?", "answer": 2}\n')
    assert load_examples(str(path))[0].answer == "2"


def test_invalid_utf8_in_parquet_names_the_row_and_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    raw = pa.array([b"1+1?", b"2+\xc5?"], type=pa.binary())
    prompts = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())  # unvalidated bytes
    path = tmp_path / "data.parquet"
    parquet.write_table(pa.table({"prompt": prompts, "answer": ["2", "4"]}), str(path))
    with pytest.raises(ValueError, match=rf"{path}: row 1: 'prompt' is not valid UTF-8"):
        load_examples(str(path))


# ---- answers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ("NaN", "'answer' must be a finite number, got nan"),
        ("Infinity", "'answer' must be a finite number, got inf"),
        ('""', "'answer' must be non-empty text, got ''"),
        ('"  "', "'answer' must be non-empty text, got '  '"),
    ],
)
def test_non_finite_or_empty_answer_is_named(tmp_path, answer, message):
    path = tmp_path / "data.jsonl"
    path.write_text(
        '{"prompt": "1+1?", "answer": 2}\n{"prompt": "2+2?", "answer": ' + answer + "}\n"
    )
    with pytest.raises(ValueError, match=rf"{path}:2: {message}"):
        load_examples(str(path))


# ---- what train_data is -----------------------------------------------------------------


def test_device_and_fifo_are_named(tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    for path, kind in (("/dev/zero", "a character device"), (str(fifo), r"a FIFO \(named pipe\)")):
        with pytest.raises(
            ValueError, match=f"train_data must be a JSONL or Parquet file, not {kind}"
        ):
            make_config({"train_data": path})
        with pytest.raises(ValueError, match=f"not {kind}: {path}"):
            load_examples(path)  # never opened: reading either would not end


# ---- the prompt-length check bounds its work ---------------------------------------------


class _Spy:
    """A tokenizer that records the longest text it was asked to tokenize."""

    def __init__(self, tokenizer):
        self._tokenizer, self.longest = tokenizer, 0

    def __call__(self, texts, **kwargs):
        batch = [texts] if isinstance(texts, str) else texts
        self.longest = max([self.longest, *map(len, batch)])
        return self._tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_a_long_prompt_is_counted_in_pieces_and_stops_over_the_limit(tokenizer):
    """A word-level tokenizer (the toy's): no character bound holds (an unknown word of any
    length is one token), so a long prompt is tokenized a bounded piece at a time."""
    spy = _Spy(tokenizer)
    examples = [
        Example("what is e017 plus 4 ?", "11", "ok:1"),
        Example("7 " * 1_000_000, "7", "big:2"),
    ]
    with pytest.raises(
        ValueError, match=r"big:2: the prompt is at least \d+ tokens \(2000000 char"
    ):
        check_prompt_lengths(examples, "{prompt}", spy, max_new_tokens=6, positions=256)
    assert spy.longest <= data_module._PIECE_TOKENS * 250


def test_a_long_prompt_that_fits_is_counted_exactly(tokenizer):
    spy = _Spy(tokenizer)  # an unknown 100,000-letter word: one token, and it fits
    length = check_prompt_lengths([Example("x" * 100_000, "1")], "{prompt}", spy, 6, 256)
    assert length == len(tokenizer("x" * 100_000)["input_ids"]) <= 4


def _bpe_tokenizer():
    """A small byte-level BPE tokenizer, built here (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(
        ["what is e017 plus 4 ? e017 is 7 . 7 plus 4 is 11 ."] * 50, trainer
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_a_bpe_prompt_over_the_character_bound_is_refused_untokenized():
    bpe = _bpe_tokenizer()
    longest = max(map(len, bpe.get_vocab()))
    spy = _Spy(bpe)
    text = "what is e017 plus 4 ? " * 200_000
    with pytest.raises(ValueError, match=rf"has {len(text)} characters.*at most {250 * longest} "):
        check_prompt_lengths([Example(text, "11", "big:1")], "{prompt}", spy, 6, 256)
    assert spy.longest == 0  # refused by its length alone
    assert data_module._longest_token_chars(bpe) == longest


MEASURE = textwrap.dedent(
    """
    import json, resource, sys, time
    import opd_fast.training.builder as builder
    from opd_fast.training.config import make_config
    from opd_fast.training.trainer import Trainer

    seconds = {}

    def timed(function):  # the stages a prompt's size can slow down
        def run(*args, **kwargs):
            started = time.monotonic()
            try:
                return function(*args, **kwargs)
            finally:
                name = function.__name__
                seconds[name] = seconds.get(name, 0) + time.monotonic() - started
        return run

    builder.load_examples = timed(builder.load_examples)
    builder.check_prompt_lengths = timed(builder.check_prompt_lengths)
    started = time.monotonic()
    try:
        Trainer(make_config(json.loads(sys.argv[1])))
        error = None
    except ValueError as caught:
        error = str(caught)
    print(json.dumps({"error": error, "stages": seconds, "total": time.monotonic() - started,
                      "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    """
)


def test_a_50_mb_single_line_prompt_is_refused_fast_in_bounded_memory(tiny, tmp_path):
    """The issue's case: RSS passed 6 GB after 193 s with no answer. In a fresh process (its
    peak RSS, the imports of torch and transformers included, under 1 GiB), reading the data
    and checking the prompts take under 5 s together; the rest of building the run is the
    tiny models' loading, the same for any data."""
    words = "what is e017 plus 4 ? e017 is 7 . 7 plus 4 is 11 . "
    path = tmp_path / "big.jsonl"
    with open(path, "w") as handle:
        handle.write(json.dumps({"prompt": "what is e001 plus 1 ?", "answer": "2"}) + "\n")
        handle.write(json.dumps({"prompt": (words * (50_000_000 // len(words))), "answer": "7"}))
    assert os.path.getsize(path) > 50_000_000
    values = {**tiny, "train_data": str(path), "max_new_tokens": 4, "run_dir": str(tmp_path / "r")}
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(values)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OPD_FAST_THREADS="1"),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"] is not None and f"{path}:2: the prompt is at least" in result["error"]
    assert sum(result["stages"].values()) < 5, result
    # The whole process, torch's and transformers' imports and the tiny models included: 1,055
    # MiB measured after the 2026-12-02 merges (under 1,024 before them; not yet traced), so
    # the bound is 1.125 GiB. The 50 MB line itself adds a few hundred MiB at most.
    assert result["max_rss_mib"] < 1152, result
