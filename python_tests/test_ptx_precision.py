"""No precision-critical expression of the CUDA kernels compiles to an approximate intrinsic
(docs/math.md, Device arithmetic): checked from the PTX that nvcc makes of every kernel with
setup.py's flags (tools/ptx_precision.py). Skipped where nvcc is absent; the flag checks run
everywhere."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import ptx_precision  # noqa: E402  (tools/ is not a package)

needs_nvcc = pytest.mark.skipif(ptx_precision.nvcc_path() is None, reason="nvcc not found")


def test_build_asks_for_no_fast_math():
    flags = ptx_precision.setup_nvcc_flags()
    for bad in ("--use_fast_math", "-use_fast_math", "-ftz=true", "-prec-div=false",
                "-prec-sqrt=false"):  # fmt: skip
        assert bad not in flags
    assert {"-ftz=false", "-prec-div=true", "-prec-sqrt=true", "-lineinfo"} <= set(flags)
    assert "--use_fast_math" not in (ROOT / "setup.py").read_text().split("NVCC_FLAGS = [")[1]


@needs_nvcc
def test_every_kernel_keeps_precise_log_exp_and_division():
    report = ptx_precision.check_kernels("90")
    assert report.ok, "\n".join(sorted(set(report.violations))[:20])
    # The check saw every kind of ex2: the streaming pass's fast exp, accurate expf and the
    # exact 2^n of accurate expm1f (the tail's log1m_exp).
    assert report.fast_exp > 0 and report.accurate_expf > 0 and report.exact_ex2 > 0


def _probe_report(source: str, *extra_flags) -> ptx_precision.Report:
    with tempfile.TemporaryDirectory() as work:
        flags = ptx_precision.setup_nvcc_flags() + list(extra_flags)
        return ptx_precision.check_ptx(ptx_precision.compile_ptx(source, work, flags))


PRECISION_CRITICAL = """\
#include "kernels/cuda/common.cuh"
#include "kernels/row_loss.h"
__global__ void probe(float* x) {
  const int i = threadIdx.x;
  x[i] = opd_fast::full_vocab_kl(x[i], x[i + 1], x[i + 2], x[i + 3], x[i + 4], x[i + 5]) +
         opd_fast::safe_exp(x[i + 6]) + opd_fast::kernels::exp_precise(x[i + 7]);
}
"""


@needs_nvcc
def test_the_check_sees_fast_math_and_a_misplaced_fast_exp():
    """Negative controls: the same precision-critical code under --use_fast_math fails (the
    log of full_vocab_kl becomes lg2.approx, expf the bare ex2 of __expf); so does
    exp_stream called from outside the streaming pass."""
    assert _probe_report(PRECISION_CRITICAL).ok
    fast = _probe_report(PRECISION_CRITICAL, "--use_fast_math")
    assert any(v.startswith("lg2.approx") for v in fast.violations), fast.violations
    assert any("neither exp_stream nor" in v for v in fast.violations), fast.violations
    misplaced = _probe_report(
        '#include "kernels/cuda/common.cuh"\n'
        "__global__ void probe(float* x) { x[0] = opd_fast::kernels::exp_stream(x[1]); }\n"
    )
    assert any("exp_stream reached outside" in v for v in misplaced.violations)


@needs_nvcc
def test_expm1f_passes_and_exp2f_of_a_fraction_fails():
    """CUDA's accurate expm1f (log1m_exp's) raises 2 to a rounded whole number, which is exact;
    exp2f of an arbitrary value is the bare approximate instruction and still fails."""
    expm1 = _probe_report(
        '#include "kernels/cuda/common.cuh"\n#include "kernels/row_loss.h"\n'
        "__global__ void probe(float* x) { x[0] = opd_fast::log1m_exp(x[1]); }\n"
    )
    assert expm1.ok and expm1.exact_ex2 > 0, expm1.violations
    fraction = _probe_report("__global__ void probe(float* x) { x[0] = exp2f(x[1]); }\n")
    assert any("neither exp_stream nor" in v for v in fraction.violations), fraction.violations


def test_whole_numbers_are_followed_through_registers():
    ptx = ptx_precision
    whole: set[str] = set()
    for instruction in (
        "cvt.rni.f32.f32 %f3, %f2;",
        "selp.f32 %f5, 0f00000000, %f3, %p1;",
        "add.f32 %f11, %f5, 0fBF800000;",
        "mov.f32 %f7, 0f3F317200;",  # ln 2's high part: no whole number
        "add.f32 %f8, %f5, %f7;",
        "fma.rn.f32 %f3, %f6, %f7, %f1;",  # %f3 overwritten by a non-whole value
    ):
        ptx.track_whole(instruction, whole)
    assert whole == {"%f5", "%f11"}
