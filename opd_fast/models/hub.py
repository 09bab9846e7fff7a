"""Models and data sets by Hugging Face Hub name, resolved the way every Hugging Face tool
resolves them: through the local cache (`HF_HOME` / `HF_HUB_CACHE`, by default
~/.cache/huggingface/hub), honouring `HF_HUB_OFFLINE` and a revision, downloading only when the
environment allows it. A local folder is used as it is.

Hub names are `ORG/NAME` (a model) and `hf:ORG/NAME[/CONFIG][:SPLIT]` (a data set: the JSONL
or Parquet files of that split, in the folder of that configuration when it has several).
Every failure is a HubError naming the repository, the revision and what to do.

Data sets are read from the snapshot by opd_fast's own JSONL/Parquet reader, not through
`datasets`: offline, `datasets` cannot load a data set from a hub-cache snapshot alone.
"""

from __future__ import annotations

import fnmatch
import os
import re

# ORG/NAME as the Hub spells repository ids.
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
DATASET_PREFIX = "hf:"

# What a causal LM needs: its config, safetensors weights and tokenizer files.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
DATA_FILES = ("*.jsonl", "*.json", "*.parquet")


class HubError(ValueError):
    """A hub name that cannot be resolved here; the message names it and says what to do."""


def is_model_name(value: str) -> bool:
    """An ORG/NAME that is not a local path: a Hub model id."""
    return bool(_REPO_ID.fullmatch(value)) and not os.path.exists(value)


def is_dataset_name(value: str) -> bool:
    return value.startswith(DATASET_PREFIX)


def parse_dataset_name(value: str) -> tuple[str, str | None, str]:
    """hf:ORG/NAME[/CONFIG][:SPLIT] -> (ORG/NAME, CONFIG or None, SPLIT or "train")."""
    body = value[len(DATASET_PREFIX) :]
    name, _, split = body.partition(":")
    parts = name.split("/")
    repo, config = "/".join(parts[:2]), (parts[2] if len(parts) == 3 else None)
    word = re.compile(r"[\w.-]+")
    if (
        len(parts) > 3
        or not _REPO_ID.fullmatch(repo)
        or (config is not None and not word.fullmatch(config))
        or (split and not word.fullmatch(split))
    ):
        raise HubError(f"a data set on the Hub is hf:ORG/NAME[/CONFIG][:SPLIT], got {value!r}")
    return repo, config, split or "train"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _snapshot(repo: str, revision: str | None, repo_type: str, allow_patterns) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = "model" if repo_type == "model" else "data set"
    at = f" at revision {revision!r}" if revision else ""
    try:
        return snapshot_download(
            repo, revision=revision, repo_type=repo_type, allow_patterns=allow_patterns
        )
    except RevisionNotFoundError:
        raise HubError(f"the {what} {repo} has no revision {revision!r} on the Hub") from None
    except RepositoryNotFoundError:
        raise HubError(
            f"no {what} {repo} on the Hub (or it is private: log in with `hf auth login`)"
        ) from None
    except LocalEntryNotFoundError:
        fetch = f"hf download {repo}" + (" --repo-type dataset" if repo_type != "model" else "")
        fetch += f" --revision {revision}" if revision else ""
        if _offline():
            raise HubError(
                f"the {what} {repo}{at} is not in the Hugging Face cache and HF_HUB_OFFLINE "
                f"is set: fetch it first where there is network (`{fetch}`), or unset "
                "HF_HUB_OFFLINE"
            ) from None
        raise HubError(
            f"the {what} {repo}{at} is not in the Hugging Face cache and the Hub cannot be "
            f"reached: fetch it first where there is network (`{fetch}`)"
        ) from None
    except OSError as error:  # network errors, a full disk
        raise HubError(f"cannot fetch the {what} {repo}{at}: {error}") from None


def resolve_model(value: str, revision: str | None = None) -> str:
    """The local folder of `value`: a folder as it is, a Hub model id through the cache."""
    if not is_model_name(value):
        return value
    return _snapshot(value, revision, "model", MODEL_FILES)


def resolve_dataset_files(value: str, revision: str | None = None) -> list[str]:
    """The local JSONL/Parquet files of split SPLIT of hf:ORG/NAME[/CONFIG][:SPLIT], found the
    way the Hub lays out data files: a file or folder named after the split (train.jsonl,
    data/train-00000-of-00001.parquet, train/part.jsonl), under the folder CONFIG when named.
    A split found under several top-level folders (configurations) must name one."""
    repo, config, split = parse_dataset_name(value)
    folder = _snapshot(
        repo, revision, "dataset", [f"**/{p}" for p in DATA_FILES] + list(DATA_FILES)
    )
    if config is not None:
        if not os.path.isdir(os.path.join(folder, config)):
            raise HubError(f"the data set {repo} has no configuration (folder) {config!r}")
        folder = os.path.join(folder, config)
    files = []
    for parent, _, names in os.walk(folder):
        for name in sorted(names):
            path = os.path.join(parent, name)
            relative = os.path.relpath(path, folder)
            if not any(fnmatch.fnmatch(name, pattern) for pattern in DATA_FILES):
                continue
            parts = relative.replace(os.sep, "/").split("/")
            stem = parts[-1].split(".")[0]
            if split in parts[:-1] or stem == split or stem.startswith(f"{split}-"):
                files.append(path)
    if not files:
        raise HubError(
            f"the data set {repo} has no JSONL or Parquet files of split {split!r} (a file "
            f"or folder named {split}, e.g. data/{split}-00000-of-00001.parquet)"
        )
    # The top-level folder of each file ("" at the root): one per configuration.
    tops = sorted({os.path.dirname(os.path.relpath(f, folder)).split(os.sep)[0] for f in files})
    if config is None and len(tops) > 1:
        raise HubError(
            f"the data set {repo} has split {split!r} in several configurations "
            f"({', '.join(tops)}): name one, e.g. hf:{repo}/{tops[0]}:{split}"
        )
    return sorted(files)
