"""The installed extension is the one this torch can use, and the CUDA kernels were compiled
wherever the build could compile them (nvcc + a CUDA build of torch), GPU or not."""

import os
import shutil

import torch

import opd_fast


def _nvcc_available() -> bool:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return os.path.exists(os.path.join(cuda_home, "bin", "nvcc")) or bool(shutil.which("nvcc"))


def test_extension_loads_for_this_torch():
    info = opd_fast.build_info()
    assert info["extension"] is not None, info
    assert info["built_against_torch"] == torch.__version__.split("+")[0]
    assert info["cpu_instruction_set"] in ("avx512", "avx2", "baseline")


def test_cuda_kernels_built_where_nvcc_and_cuda_torch_exist():
    wanted = (
        torch.version.cuda is not None
        and _nvcc_available()
        and os.environ.get("OPD_FAST_SKIP_CUDA_BUILD", "0") != "1"
    )
    if wanted:
        assert opd_fast.build_info()["with_cuda"], "nvcc is present but CUDA kernels were not built"


def test_compiled_names_agree_with_python():
    from opd_fast import _C
    from opd_fast.op import names

    assert tuple(_C.variants) == names.VARIANTS
    assert tuple(_C.estimators) == names.ESTIMATORS
    assert tuple(_C.token_metric_names) == names.TOKEN_METRIC_NAMES
    assert _C.max_k == names.MAX_K


def test_a_build_with_other_names_is_refused():
    import types

    from opd_fast import _C
    from opd_fast.op._extension import _names_disagreement

    exported = {name: getattr(_C, name) for name in ("variants", "estimators", "max_k")}
    exported["token_metric_names"] = _C.token_metric_names
    assert _names_disagreement(types.SimpleNamespace(**exported)) is None
    for name, other in (("variants", tuple(reversed(_C.variants))), ("max_k", 64)):
        stale = types.SimpleNamespace(**{**exported, name: other})
        assert f"_C.{name} is {other!r}" in _names_disagreement(stale)
    assert "_C.variants is None" in _names_disagreement(types.SimpleNamespace())
