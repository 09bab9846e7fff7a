"""Models and data sets by Hugging Face Hub name, resolved the way every Hugging Face tool
resolves them: through the local cache (`HF_HOME` / `HF_HUB_CACHE`, by default
~/.cache/huggingface/hub), honouring `HF_HUB_OFFLINE` and a revision, downloading only when the
environment allows it. A local folder is used as it is.

Hub names are `ORG/NAME` (a model) and `hf:ORG/NAME[:SPLIT]` (a data set, its JSONL or
Parquet files of that split). Every failure is a HubError naming the repository, the revision
and what to do.
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


def parse_dataset_name(value: str) -> tuple[str, str]:
    """hf:ORG/NAME[:SPLIT] -> (ORG/NAME, SPLIT or "train")."""
    body = value[len(DATASET_PREFIX) :]
    repo, _, split = body.partition(":")
    if not _REPO_ID.fullmatch(repo) or (split and not re.fullmatch(r"[\w.-]+", split)):
        raise HubError(f"a data set on the Hub is hf:ORG/NAME[:SPLIT], got {value!r}")
    return repo, split or "train"


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
    """The local JSONL/Parquet files of split SPLIT of hf:ORG/NAME[:SPLIT], found the way the
    Hub lays out data files: a file or folder named after the split (train.jsonl,
    data/train-00000-of-00001.parquet, train/part.jsonl)."""
    repo, split = parse_dataset_name(value)
    folder = _snapshot(
        repo, revision, "dataset", [f"**/{p}" for p in DATA_FILES] + list(DATA_FILES)
    )
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
    return sorted(files)
