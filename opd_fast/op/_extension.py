"""Loading the compiled extension opd_fast._C, with errors that say how to fix a bad build.

The extension exports the names and limits its kernels were compiled with; a build whose
names disagree with opd_fast.op.names (a stale build of another version) is refused here,
so a variant can never reach the wrong kernel branch.
"""

from __future__ import annotations

import torch

from opd_fast.op import names

_BUILD_HINT = (
    "Build it from the repository root with `pip install -e .` (needs a C++ compiler; "
    "add `--no-build-isolation` to build against the torch already installed)."
)

try:
    from opd_fast import _C  # noqa: F401  (loading registers torch.ops.opd_fast.*)

    _LOAD_ERROR: Exception | None = None
except ImportError as error:  # missing, or built against another torch (undefined symbols)
    _C = None
    _LOAD_ERROR = error


def _names_disagreement(extension) -> str | None:
    """What the compiled kernels and opd_fast.op.names disagree on, or None."""
    expected = {
        "variants": names.VARIANTS,
        "estimators": names.ESTIMATORS,
        "token_metric_names": names.TOKEN_METRIC_NAMES,
        "max_k": names.MAX_K,
    }
    for attribute, value in expected.items():
        compiled = getattr(extension, attribute, None)
        if isinstance(compiled, list):
            compiled = tuple(compiled)
        if compiled != value:
            return f"_C.{attribute} is {compiled!r}, opd_fast.op.names says {value!r}"
    return None


if _C is not None:
    _disagreement = _names_disagreement(_C)
    if _disagreement is not None:
        _LOAD_ERROR = ImportError(f"{_C.__file__} is a stale build: {_disagreement}")
        _C = None


def extension_available() -> bool:
    return _C is not None


def require_extension(device: torch.device | None = None) -> None:
    """Raise a clear RuntimeError if the kernels for `device` are not built."""
    if _C is None:
        raise RuntimeError(
            f"opd_fast's compiled extension could not be loaded ({_LOAD_ERROR}). {_BUILD_HINT}"
        )
    running = torch.__version__.split("+")[0]
    if _C.torch_version != running:
        raise RuntimeError(
            f"opd_fast._C was built against torch {_C.torch_version} but torch {running} is "
            f"running. {_BUILD_HINT}"
        )
    if device is not None and device.type == "cuda" and not _C.with_cuda:
        raise RuntimeError(
            "opd_fast was built without its CUDA kernels (CPU torch, no nvcc, or "
            "OPD_FAST_SKIP_CUDA_BUILD=1). Rebuild with a CUDA build of torch and CUDA_HOME set."
        )


def build_info() -> dict:
    """How the extension was built, for benchmark records and bug reports."""
    if _C is None:
        return {"extension": None, "error": str(_LOAD_ERROR)}
    return {
        "extension": _C.__file__,
        "with_cuda": bool(_C.with_cuda),
        "built_against_torch": _C.torch_version,
        "cpu_instruction_set": _C.cpu_instruction_set(),
    }
