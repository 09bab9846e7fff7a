"""Models and data sets by Hub name, from a local Hugging Face cache laid out by hand the way
huggingface_hub lays it out (nothing is downloaded: HF_HUB_OFFLINE=1): a run trains from
ORG/NAME models and an hf:ORG/NAME data set with other column names; a name that is not
cached, or a revision that is not, is a named error before any model loads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from opd_fast.models import hub
from opd_fast.toy.tiny import tiny_setup

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cache_repo(cache: str, kind: str, repo: str, files: dict[str, str]) -> None:
    """A repository in a hub cache: refs/main -> a snapshot holding `files` (relative path ->
    the local file to put there)."""
    folder = os.path.join(cache, f"{kind}s--{repo.replace('/', '--')}")
    snapshot = os.path.join(folder, "snapshots", COMMIT)
    for relative, source in files.items():
        target = os.path.join(snapshot, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy(source, target)
    os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
    with open(os.path.join(folder, "refs", "main"), "w") as handle:
        handle.write(COMMIT)


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory):
    """HF_HOME with toyorg/tiny-student, toyorg/tiny-teacher and the data set toyorg/prompts
    (question/solution columns, a train and a test split as Parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("hub")
    tiny = tiny_setup(str(root / "src"))
    cache = str(root / "hf" / "hub")
    for name in ("student", "teacher"):
        folder = tiny[name]
        _cache_repo(cache, "model", f"toyorg/tiny-{name}",
                    {f: os.path.join(folder, f) for f in os.listdir(folder)})  # fmt: skip
    with open(tiny["train_data"]) as handle:
        rows = [json.loads(line) for line in handle]
    table = pa.table({"question": [r["prompt"] for r in rows],
                      "solution": [r["answer"] for r in rows]})  # fmt: skip
    pq.write_table(table, str(root / "train.parquet"))
    pq.write_table(table.slice(0, 4), str(root / "test.parquet"))
    _cache_repo(cache, "dataset", "toyorg/prompts", {
        "data/train-00000-of-00001.parquet": str(root / "train.parquet"),
        "data/test-00000-of-00001.parquet": str(root / "test.parquet"),
    })  # fmt: skip
    # Two configurations (folders) of the same split, as many Hub data sets have.
    _cache_repo(cache, "dataset", "toyorg/configs", {
        "all/train-00000-of-00001.parquet": str(root / "train.parquet"),
        "en/train-00000-of-00001.parquet": str(root / "test.parquet"),
    })  # fmt: skip
    return str(root / "hf")


def _opd_fast(hub_home, tmp_path, *sets):
    env = dict(os.environ, HF_HOME=hub_home, HF_HUB_OFFLINE="1", OPD_FAST_THREADS="1")
    env.pop("HF_HUB_CACHE", None)
    command = [sys.executable, "-m", "opd_fast", "train", "--set", f"run_dir={tmp_path / 'run'}"]
    for value in sets:
        command += ["--set", value]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


RUN = ["steps=1", "prompts_per_step=2", "rollouts_per_prompt=2", "max_new_tokens=4",
       "eval_every=0", "eval_max_prompts=2", "checkpoint_every=0", "progress=false",
       "micro_batch_size=4"]  # fmt: skip


def test_a_run_from_hub_names_offline(hub_home, tmp_path):
    result = _opd_fast(
        hub_home, tmp_path, "student=toyorg/tiny-student", "teacher=toyorg/tiny-teacher",
        "train_data=hf:toyorg/prompts", "eval_data=hf:toyorg/prompts:test",
        "prompt_column=question", "answer_column=solution", *RUN,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "run" / "metrics.jsonl") as handle:
        kinds = [json.loads(line)["kind"] for line in handle]
    assert kinds == ["eval", "train", "eval"]


@pytest.fixture
def offline_cache(hub_home, monkeypatch):
    """This process reads the hand-made cache, offline."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", os.path.join(hub_home, "hub"))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"student": "toyorg/not-cached"}, "the model toyorg/not-cached is not in the Hugging "
         "Face cache and HF_HUB_OFFLINE is set: fetch it first where there is network (`hf "
         "download toyorg/not-cached`)"),
        ({"student": "toyorg/tiny-student", "student_revision": "v9"}, "the model "
         "toyorg/tiny-student at revision 'v9' is not in the Hugging Face cache"),
        ({"teacher": "toyorg/tiny-teacher", "teacher_revision": "v9"}, "the model "
         "toyorg/tiny-teacher at revision 'v9'"),
        ({"train_data": "hf:toyorg/prompts:validation"}, "has no JSONL or Parquet files of split "
         "'validation'"),
        ({"train_data": "hf:toyorg/not-cached"}, "the data set toyorg/not-cached is not in the "
         "Hugging Face cache"),
        ({"train_data": "hf:toyorg/configs"}, "the data set toyorg/configs has split 'train' "
         "in several configurations (all, en): name one, e.g. hf:toyorg/configs/all:train"),
        ({"train_data": "hf:toyorg/configs/fr"}, "has no configuration (folder) 'fr'"),
    ],
)  # fmt: skip
def test_names_that_cannot_be_resolved_are_named_before_loading(
    offline_cache, tmp_path, monkeypatch, values, message
):
    from opd_fast.training import builder
    from opd_fast.training.config import make_config

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the names were resolved")

    monkeypatch.setattr(builder, "load_pair", no_loading)
    base = {"student": "toyorg/tiny-student", "teacher": "toyorg/tiny-teacher",
            "train_data": "hf:toyorg/prompts", "eval_data": "hf:toyorg/prompts:test",
            "prompt_column": "question", "answer_column": "solution",
            "run_dir": str(tmp_path / "run"), "progress": False}  # fmt: skip
    with pytest.raises(hub.HubError) as error:
        builder.build_run(make_config({**base, **values}))
    assert message in str(error.value)


def test_a_bad_data_set_name_is_a_config_error():
    from opd_fast.training.config import make_config

    with pytest.raises(ValueError, match="config: train_data: a data set on the Hub is hf:ORG"):
        make_config({"train_data": "hf:not a name"})


def test_local_folders_are_not_hub_names(tmp_path):
    assert hub.is_model_name("Qwen/Qwen3-1.7B")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    os.chdir(tmp_path)
    assert not hub.is_model_name("org/name")  # a folder here wins
    assert hub.resolve_model(str(tmp_path)) == str(tmp_path)
    assert hub.parse_dataset_name("hf:a/b") == ("a/b", None, "train")
    assert hub.parse_dataset_name("hf:a/b:test") == ("a/b", None, "test")
    assert hub.parse_dataset_name("hf:a/b/en:test") == ("a/b", "en", "test")


def test_a_configuration_selects_its_folder(offline_cache):
    from opd_fast.training.data import load_examples

    columns = ("question", "solution")
    every = load_examples("hf:toyorg/configs/all", *columns)
    english = load_examples("hf:toyorg/configs/en:train", *columns)
    assert len(english) == 4 and len(every) > len(english)
    assert [e.prompt for e in english] == [e.prompt for e in every[:4]]
