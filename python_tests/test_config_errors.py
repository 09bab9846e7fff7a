"""Every bad config value, config file, data row and unreachable teacher is a named error,
reported before any model loads where it can be, and the CLI prints it without a traceback
(issue 13, item 11)."""

from __future__ import annotations

import json
import socket
import time

import pytest

import opd_fast.training.builder as builder_module
import opd_fast.training.trainer as trainer_module
from opd_fast.cli import main
from opd_fast.models.loading import Placement
from opd_fast.teachers.http import TeacherUnavailableError
from opd_fast.toy.tiny import tiny_setup
from opd_fast.training.config import load_config, make_config
from opd_fast.training.data import load_examples
from opd_fast.training.trainer import Trainer

RUN = dict(
    steps=2,
    prompts_per_step=2,
    rollouts_per_prompt=1,
    max_new_tokens=4,
    eval_every=0,
    checkpoint_every=0,
    progress=False,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("tiny")))


# ---- config values: type, finiteness, range, named -----------------------------------------

BAD_YAML_VALUES = [
    ("steps: [1, 2]", r"steps must be an integer, got \[1, 2\] \(list\)"),
    ("lr: {a: 1}", r"lr must be a number, got \{'a': 1\} \(dict\)"),
    ("micro_batch_size: 2.5", r"micro_batch_size must be an integer, got 2.5"),
    ("steps: 2.5", r"steps must be an integer, got 2.5"),
    ("steps: .inf", r"steps must be an integer, got inf"),
    ("k: 1.5", r"k must be an integer, got 1.5"),
    ("lr: .nan", r"lr must be a finite number, got nan"),
    ("lr: .inf", r"lr must be a finite number, got inf"),
    ("grad_clip: -1.0", r"grad_clip must be > 0"),
    ("weight_decay: -0.1", r"weight_decay must be >= 0"),
    ("adam_beta2: 1.0", r"adam_beta2 must be in \[0, 1\)"),
    ("seed: -3", r"seed must be in \[0, 2\*\*63\)"),
    ("progress: 3", r"progress must be true or false, got 3 \(int\)"),
    ("steps: true", r"steps must be an integer, got True \(bool\)"),
    ("variant: 7", r"variant must be a string, got 7 \(int\)"),
    ("estimator: tails", r"unknown estimator 'tails'; expected one of \('pg', 'exact', 'tail'\)"),
    ("student: [a]", r"student must be a string"),
    ("device: tpu9", r"device must be auto, cpu, cuda or cuda:N, got 'tpu9'"),
    ("dtype: fp8", r"dtype must be one of auto, float32"),
    ("attn_implementation: magic", r"attn_implementation must be one of"),
    ("threads: 0", r"threads must be auto, auto-free or a positive integer, got 0"),
    ("threads: fastest", r"threads must be auto, auto-free or a positive integer"),
    ("threads: 1.5", r"threads must be an integer or a string, got 1.5 \(float\)"),
    ("teacher_url: localhost:8000", r"teacher_url must be http\(s\)://host"),
    ("teacher_url: 'http://host:port'", r"teacher_url must be http\(s\)://host"),
    ("teacher_token: ''", r"teacher_token is empty"),
    ("teacher_wait_s: 0", r"teacher_wait_s must be > 0"),
    ("prompt_template: 'Q: {question}'", r"prompt_template must be 'chat' or a format string"),
    ("prompt_template: 'no placeholder'", r"prompt_template never uses \{prompt\}"),
    ("cold_start_lr: 0", r"cold_start_lr must be > 0"),
]


@pytest.mark.parametrize(("line", "message"), BAD_YAML_VALUES, ids=[b[0] for b in BAD_YAML_VALUES])
def test_bad_yaml_value_is_named(tmp_path, line, message):
    path = tmp_path / "config.yaml"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match="config: " + message):
        load_config(str(path))


@pytest.mark.parametrize("variant", ["union_topk", "full_vocab", "sampled_token"])
def test_tail_estimator_is_accepted_for_every_variant(variant):
    assert make_config({"estimator": "tail", "variant": variant}).estimator == "tail"


def test_integral_float_is_an_integer():
    assert make_config({"steps": 1000.0}).steps == 1000
    assert make_config({"lr": 1}).lr == 1.0


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("steps", "2.5", "steps must be an integer, got '2.5'"),
        ("lr", "fast", "lr must be a number, got 'fast'"),
        ("lr", "inf", "lr must be a finite number, got inf"),
        ("progress", "maybe", "progress must be true or false"),
    ],
)
def test_bad_set_override_is_named(key, value, message):
    with pytest.raises(ValueError, match=f"config: {message}"):
        load_config(None, {key: value})


def test_bad_value_is_reported_before_any_model_loads(tiny, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(builder_module, "load_pair", no_loading)
    for values in ({"k": 1.5}, {"steps": float("inf")}, {"device": "tpu9"}):
        with pytest.raises(ValueError, match="config: "):
            trainer_module.train({**tiny, **RUN, "run_dir": str(tmp_path / "run"), **values})


def test_unavailable_device_is_named_before_models_load():
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N, got 'tpu9'"):
        Placement.resolve("tpu9")
    if not __import__("torch").cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is available"):
            Placement.resolve("cuda:0")


# ---- config files and paths ------------------------------------------------------------------


def test_config_path_that_is_a_folder(tmp_path):
    with pytest.raises(ValueError, match="config file is not a file"):
        load_config(str(tmp_path))


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("steps: 3\nk: [1, 2\nlr: 1e-5\n")
    with pytest.raises(ValueError, match=rf"{path}:\d+: not valid YAML"):
        load_config(str(path))


def test_json_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "steps": 3,\n  "k": ,\n}\n')
    with pytest.raises(ValueError, match=rf"{path}:3: not valid JSON"):
        load_config(str(path))


def test_non_model_folder_as_student(tmp_path):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="student is not a Hugging Face model folder"):
        make_config({"student": str(folder)})


def test_data_folder_instead_of_file(tmp_path):
    with pytest.raises(ValueError, match="train_data must be a JSONL or Parquet file"):
        make_config({"train_data": str(tmp_path)})


# ---- data rows ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('{"prompt": "2+2?", "answer": null}', "'answer' must be text or a number, got None"),
        ('{"prompt": "2+2?", "answer": [4]}', r"'answer' must be text or a number, got \[4\]"),
        ('{"prompt": null, "answer": "4"}', "'prompt' must be non-empty text"),
        ('{"prompt": "2+2?"}', "the row has no 'answer' field"),
        ('["2+2?", "4"]', "a row must be an object"),
        ('{"prompt": "2+2?", "answer": "4"', "not valid JSON"),
    ],
)
def test_bad_data_row_names_file_and_line(tmp_path, row, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "1+1?", "answer": 2}\n\n' + row + "\n")
    with pytest.raises(ValueError, match=rf"{path}:3: {message}"):
        load_examples(str(path))


def test_numeric_answer_is_text_and_rows_know_their_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "1+1?", "answer": 2}\n\n{"prompt": "3*3?", "answer": "9"}\n')
    first, second = load_examples(str(path))
    assert (first.answer, second.answer) == ("2", "9")
    assert (first.source, second.source) == (f"{path}:1", f"{path}:3")


def test_prompt_longer_than_the_model_is_named(tiny, tmp_path):
    path = tmp_path / "long.jsonl"
    rows = [{"prompt": "1+1?", "answer": "2"}, {"prompt": "7 " * 400, "answer": "7"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = make_config({**tiny, **RUN, "train_data": str(path), "run_dir": str(tmp_path / "r")})
    with pytest.raises(ValueError, match=rf"{path}:2: the prompt is \d+ tokens.*positions"):
        Trainer(config)


# ---- a teacher server that never answers ---------------------------------------------------


def _dead_url() -> str:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_dead_teacher_url_fails_within_the_stated_wait(tiny, tmp_path):
    config = make_config(
        {**tiny, **RUN, "teacher_url": _dead_url(), "teacher_wait_s": 1.5, "run_dir": str(tmp_path)}
    )
    started = time.monotonic()
    with pytest.raises(TeacherUnavailableError, match=r"waiting up to 1.5 s.*Connection"):
        Trainer(config)
    assert time.monotonic() - started < 10


# ---- the CLI: one error path, traceback behind --debug -------------------------------------


def test_cli_prints_expected_failures_without_traceback(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2]\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert main(["train", "--config", str(tmp_path)]) == 2
    config = tmp_path / "dead.json"
    run_dir = str(tmp_path / "run")
    values = {**tiny, **RUN, "teacher_url": _dead_url(), "teacher_wait_s": 0.5, "run_dir": run_dir}
    config.write_text(json.dumps(values))
    assert main(["train", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "config: steps must be an integer" in err
    assert "config file is not a file" in err
    assert "teacher server" in err and "unavailable" in err
    assert "Traceback" not in err and err.count("--debug") == 3


def test_cli_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2]\n")
    with pytest.raises(ValueError, match="steps must be an integer"):
        main(["--debug", "train", "--config", str(bad)])
    with pytest.raises(ValueError, match="steps must be an integer"):
        main(["train", "--debug", "--config", str(bad)])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"prompts_per_step": 3},
            r"prompts_per_step \(3\) must be a multiple of the number of ranks \(2\)",
        ),
        ({"cold_start_steps": 5}, "cold_start_steps is not supported in a multi-rank run"),
        (
            {"rollout_unshard": "on", "fsdp_cpu_offload": True},
            "rollout_unshard: on gathers the whole student onto the GPU",
        ),
    ],
)
def test_multi_rank_limits_are_checked_with_the_config(values, message, monkeypatch):
    """What a run of several ranks cannot do is refused when the config is validated: for
    the world size asked for, or the one torchrun's environment says."""
    with pytest.raises(ValueError, match=f"config: {message}"):
        load_config(None, values, world_size=2)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=f"config: {message}"):
        load_config(None, values)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    load_config(None, values)  # one process: fine


def test_nproc_per_node_validates_before_torchrun_starts(capsys):
    """`--nproc-per-node 2` checks the config for 2 ranks before it relaunches anything."""
    code = main(["demo", "--nproc-per-node", "2", "--set", "prompts_per_step=3"])
    assert code == 2
    assert "must be a multiple of the number of ranks (2)" in capsys.readouterr().err
