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
