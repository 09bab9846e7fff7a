"""How a checkpoint's resume state is stored so that loading it runs no code.

A state (nested dicts, lists, tuples, numbers, strings, None, tensors and NumPy arrays: the
optimizer's, the scheduler's, the sampler's, the RNGs') is one safetensors file: the tensors
as tensors, everything else as JSON in the file's metadata, each tensor and array replaced by
a reference. Reading it parses JSON and copies bytes; nothing is unpickled.

    {"__tensor__": "t3"}                    the tensor stored under that key
    {"__ndarray__": [...], "dtype": "u4"}   a NumPy array (the NumPy RNG's key)
    {"__tuple__": [...]}                    a tuple (the RNG states are tuples)
    {"__items__": [[key, value], ...]}      a dict whose keys are not all plain strings

Checkpoints written before (format 1: trainer_state.pt, rank_*.pt, by torch.save) load with
torch.load(weights_only=True), which allows tensors and plain containers only, plus the NumPy
types of an RNG state; anything else in them is refused with a named error, unrun. torch.load
skips the zip's CRCs, so they are checked first (and by the scan, `folders.verify`): a damaged
member is refused even when the manifest was resealed over it. torch.distributed.checkpoint's
own metadata is a pickle too; safe_dcp_reader reads it allowing only the classes DCP writes.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from typing import Any

import numpy as np
import torch

STATE_KEY = "opd_fast_state"  # the safetensors metadata entry holding the JSON


class StateFormatError(ValueError):
    """A state file that cannot be stored or read safely; the message names the file."""


# ---- the safetensors + JSON format ----------------------------------------------------------


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": value.dtype.str}
    if isinstance(value, np.generic):  # a NumPy scalar: its Python value
        return value.item()
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(item, tensors, where) for item in value]}
    if isinstance(value, list):
        return [_encode(item, tensors, where) for item in value]
    if isinstance(value, dict):
        if all(isinstance(key, str) and not key.startswith("__") for key in value):
            return {key: _encode(item, tensors, f"{where}.{key}") for key, item in value.items()}
        return {
            "__items__": [
                [_encode(key, tensors, where), _encode(item, tensors, f"{where}[{key!r}]")]
                for key, item in value.items()
            ]
        }
    raise StateFormatError(
        f"trainer state: {where} is a {type(value).__name__}, which a checkpoint does not store "
        "(tensors, arrays, numbers, strings, lists, tuples and dicts only)"
    )


def _decode(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(value, list):
        return [_decode(item, tensors, path) for item in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        key = value["__tensor__"]
        if not isinstance(key, str) or key not in tensors:
            raise StateFormatError(f"{path}: refers to a tensor {key!r} it does not hold")
        return tensors[key]
    if "__ndarray__" in value:
        try:
            return np.array(value["__ndarray__"], dtype=np.dtype(value["dtype"]))
        except (KeyError, TypeError, ValueError) as error:
            raise StateFormatError(f"{path}: a malformed array ({error})") from None
    if "__tuple__" in value:
        return tuple(_decode(item, tensors, path) for item in value["__tuple__"])
    if "__items__" in value:
        items = value["__items__"]
        if not isinstance(items, list) or not all(
            isinstance(pair, list) and len(pair) == 2 for pair in items
        ):
            raise StateFormatError(f"{path}: a malformed mapping")
        decoded = {}
        for key, item in items:
            key = _decode(key, tensors, path)
            if isinstance(key, list):
                raise StateFormatError(f"{path}: a mapping key is a list")
            decoded[key] = _decode(item, tensors, path)
        return decoded
    return {key: _decode(item, tensors, path) for key, item in value.items()}


def save_state(path: str, state: dict[str, Any]) -> None:
    """Write `state` as one safetensors file (tensors) with its JSON (the rest)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    text = json.dumps(_encode(state, tensors, "state"))
    save_file(tensors, path, metadata={STATE_KEY: text})


def load_state(path: str) -> dict[str, Any]:
    """save_state's dict; StateFormatError naming the file when it cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            text = (handle.metadata() or {}).get(STATE_KEY)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own kinds on a damaged file
        raise StateFormatError(f"cannot read {path}: {error}") from None
    if text is None:
        raise StateFormatError(f"{path} holds no {STATE_KEY} entry (not a trainer state file)")
    try:
        state = _decode(json.loads(text), tensors, path)
    except (ValueError, RecursionError) as error:
        raise StateFormatError(f"cannot read {path}: {error}") from None
    if not isinstance(state, dict):
        raise StateFormatError(f"{path}: the state is not a mapping")
    return state


# ---- format 1: torch.save files, loaded without running code --------------------------------


def _numpy_globals() -> list:
    """What a pickled NumPy RNG state names: the array reconstructor (under NumPy 1's module
    name too), ndarray, dtype and the uint32 dtype class."""
    from numpy._core import multiarray  # NumPy 2; NumPy 1 files name numpy.core.multiarray

    reconstruct = multiarray._reconstruct
    allowed = [
        reconstruct,
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
    ]
    for name in ("UInt32DType", "Int64DType", "Float64DType"):
        if hasattr(np, "dtypes") and hasattr(np.dtypes, name):
            allowed.append(getattr(np.dtypes, name))
    return allowed


def zip_problem(path: str) -> str | None:
    """What is wrong with a torch.save zip (None: every member matches its CRC, which
    torch.load does not check)."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError) as error:
        return f"not a torch.save zip ({error})"
    except Exception as error:  # zlib errors on a damaged compressed member
        return f"a damaged zip ({error})"
    if damaged is not None:
        return f"member {damaged} does not match its CRC (damaged)"
    return None


def load_legacy(path: str) -> Any:
    """A format-1 torch.save file, with weights_only=True and only the NumPy types of an RNG
    state allowed besides tensors and plain containers; StateFormatError naming what else it
    holds (nothing of it is run) or a damaged zip member."""
    problem = zip_problem(path)
    if problem is not None:
        raise StateFormatError(f"cannot read {path}: {problem}")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        named = [line for line in lines if "unsupported" in line.lower()]  # names the global
        detail = (named or lines or ["refused by torch.load(weights_only=True)"])[0]
        raise StateFormatError(
            f"{path} refused: it holds more than tensors, numbers, strings, containers and "
            f"NumPy RNG state ({detail}); loading a checkpoint never runs code from it"
        ) from None
    except Exception as error:  # torch raises many kinds on a damaged file
        raise StateFormatError(f"cannot read {path}: {error}") from None


# ---- torch.distributed.checkpoint's metadata ------------------------------------------------

_DCP_MODULE = "torch.distributed.checkpoint.metadata"
_DCP_NAMES = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's .metadata allowing only what DCP writes there: its metadata classes,
    torch.Size, dtypes, layouts, paths."""

    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_NAMES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == _DCP_MODULE:
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__ == _DCP_MODULE:
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")


def dcp_failure(error: BaseException) -> str:
    """One line per failed rank of a DCP CheckpointException (its str is every traceback)."""
    failures = getattr(error, "failures", None)
    if not isinstance(failures, dict) or not failures:
        return str(error)
    parts = []
    for rank, failure in sorted(failures.items()):
        failure = failure[0] if isinstance(failure, tuple) else failure
        parts.append(f"rank {rank}: {type(failure).__name__}: {failure}")
    return "; ".join(parts)


def safe_dcp_reader(checkpoint_dir: str):
    """A torch.distributed.checkpoint FileSystemReader for `checkpoint_dir` whose metadata is
    read with _MetadataUnpickler (the stock reader runs pickle.load on it)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeDCPReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as handle:
                try:
                    metadata = _MetadataUnpickler(handle).load()
                except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as error:
                    raise StateFormatError(f"{path} refused: {error}") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeDCPReader(checkpoint_dir)
