"""Build opd_fast and its compiled extension opd_fast._C.

The CPU kernels are always built. The CUDA kernels are built when torch is a CUDA build and
nvcc is found (CUDA_HOME, else /usr/local/cuda): a GPU is NOT needed to compile them.
Switches:
  OPD_FAST_SKIP_CUDA_BUILD=1     build the CPU kernels only
  OPD_FAST_CUDA_ARCHS="80;90"    CUDA compute capabilities to build for (default 80;90)
  MAX_JOBS=N                     parallel compile jobs (ninja)
"""

import glob
import os
import shutil

from setuptools import setup

# torch's extension builder looks for nvcc on PATH when CUDA_HOME is unset; a stray nvcc
# outside the toolkit (e.g. /usr/local/bin/nvcc) makes it guess the wrong toolkit root.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

ROOT = os.path.dirname(os.path.abspath(__file__))

# nvcc flags besides the version macro and the gencode list. No --use_fast_math: it would turn
# every log, exp and division into an approximate intrinsic (lg2.approx, ex2.approx,
# div.approx), precision-critical ones included. The kernels ask for the one fast intrinsic
# they use by name, in the streaming pass only (common.cuh, exp_stream; docs/math.md, Device
# arithmetic). The rest are nvcc's defaults, spelled out: IEEE division and square root,
# denormals kept, multiply-adds contracted. python_tests/test_ptx_precision.py reads this list
# and checks the PTX it produces.
NVCC_FLAGS = [
    "-O3",
    "-lineinfo",
    "-ftz=false",
    "-prec-div=true",
    "-prec-sqrt=true",
    "-fmad=true",
]


def _cuda_requested() -> bool:
    if os.environ.get("OPD_FAST_SKIP_CUDA_BUILD", "0") == "1":
        return False
    if torch.version.cuda is None:
        print("opd_fast: torch is a CPU build; building the CPU kernels only")
        return False
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        print("opd_fast: nvcc not found (set CUDA_HOME); building the CPU kernels only")
        return False
    return True


def _gencode_flags() -> list[str]:
    archs = os.environ.get("OPD_FAST_CUDA_ARCHS", "80;90")
    flags = []
    for arch in filter(None, (a.strip().replace(".", "") for a in archs.split(";"))):
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def _extension():
    # csrc/kernels: torch-free kernels; csrc/launchers: ATen launchers; registration.cpp: the ops.
    cpu_sources = ["csrc/registration.cpp", "csrc/bindings.cpp"]
    cpu_sources += sorted(glob.glob("csrc/kernels/cpu/*.cpp") + glob.glob("csrc/launchers/*.cpp"))
    version_macro = f'-DOPD_FAST_TORCH_VERSION="{torch.__version__.split("+")[0]}"'
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", version_macro]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _cuda_requested():
        # The arch list is ours; keep torch from probing for a GPU to choose one.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        return CUDAExtension(
            name="opd_fast._C",
            sources=cpu_sources + sorted(glob.glob("csrc/launchers/*.cu")),
            include_dirs=include_dirs,
            define_macros=[("OPD_FAST_WITH_CUDA", None)],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": NVCC_FLAGS + [version_macro] + _gencode_flags(),
            },
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        name="opd_fast._C",
        sources=cpu_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
