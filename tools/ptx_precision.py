"""Check from the PTX that no precision-critical expression of the CUDA kernels compiles to an
approximate intrinsic (docs/math.md, Device arithmetic).

    python tools/ptx_precision.py            # compiles csrc/kernels/cuda for sm_90, reports
    python tools/ptx_precision.py --arch 80

The kernels are compiled with setup.py's NVCC_FLAGS (read from setup.py, so the check follows
the build) and -lineinfo, whose `.loc` directives tie every PTX instruction to a source line
and, through `inlined_at`, to the lines that called it. The rules:

- lg2.approx, div.approx, div.full, rcp.approx (f32), sqrt.approx, rsqrt.approx, sin/cos,
  tanh and ex2 on f16/bf16: none at all. (Accurate logf, division and sqrtf use none of them.)
- rcp.approx.ftz.f64: allowed. It is the seed that CUDA's double division and log refine by
  Newton steps; nothing in the kernels asks for it.
- ex2.approx.f32 / ex2.approx.ftz.f32: either the last step of CUDA's accurate expf, which
  is recognised by its range reduction in the instructions before it (an fma.rm.f32 and the
  low part of log2(e), 0f32A57060, which only a compensated reduction needs), or the
  kernels' one fast exp (the line of common.cuh marked `opd-fast-math: exp_stream`) reached
  only from the streaming-pass functions in STREAMING_FUNCTIONS, or an ex2 of a whole number
  (2^n is exact): CUDA's accurate expm1f scales by 2^n for the n it rounded x / ln 2 to
  (cvt.rni). Whole numbers are followed through the registers (cvt.rni/rzi/rmi/rpi, and mov,
  selp and add of whole numbers). Any other ex2 (__expf, exp2f, a fast exp called from
  elsewhere) fails.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CSRC = os.path.join(ROOT, "csrc")
FAST_MARKER = "opd-fast-math: exp_stream"
# Where the fast exp may be used: one exp per element of a streaming pass (file, function).
STREAMING_FUNCTIONS = (
    ("kernels/cuda/opd_forward.cuh", "softmax_add"),
    ("kernels/cuda/opd_backward.cuh", "dense_term"),
)
FORBIDDEN = re.compile(
    r"\b(lg2\.approx\S*|div\.approx\S*|div\.full\S*|rcp\.approx(?!\.ftz\.f64)\S*|"
    r"sqrt\.approx\S*|rsqrt\.approx\S*|sin\.approx\S*|cos\.approx\S*|tanh\.approx\S*|"
    r"ex2\.approx(?:\.ftz)?\.(?:f16|bf16)\S*)"
)
EX2_F32 = re.compile(r"\bex2\.approx(?:\.ftz)?\.f32\b")
# CUDA's accurate expf: its range reduction (an fma.rm.f32 and log2(e)'s low part) lies within
# this many instructions before its ex2.
EXPF_WINDOW = 16
LOG2E_LOW = "0f32A57060"
# f32 instructions whose result is a whole number when their operands are (or, for the
# roundings to an integer, always).
ROUND_TO_INTEGER = re.compile(r"^cvt\.r[nzmp]i\.f32\.f32\s+(%f\d+),")
KEEPS_INTEGER = re.compile(r"^(?:mov|selp|add|sub|neg)\.f32\s+(%f\d+),\s*(.*?);")

PROBE = """\
// Every kernel of csrc/kernels/cuda, for every logits dtype (what csrc/launchers/cuda.cu
// instantiates, without ATen).
#include "kernels/cuda/opd_backward.cuh"
#include "kernels/cuda/opd_forward.cuh"
#include "kernels/cuda/opd_sparse.cuh"
namespace opd_fast {
namespace kernels {
template <typename T>
void instantiate() {
  launch(ForwardParams<T>{}, nullptr);
  launch(BackwardParams<T>{}, nullptr);
  launch(TopkParams<T>{}, nullptr);
  launch(SparseForwardParams<T>{}, nullptr);
}
template void instantiate<float>();
template void instantiate<double>();
template void instantiate<__nv_bfloat16>();
template void instantiate<__half>();
}  // namespace kernels
}  // namespace opd_fast
"""


def nvcc_path() -> str | None:
    """nvcc under CUDA_HOME, else /usr/local/cuda, else on PATH; None where there is none."""
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    candidate = os.path.join(home, "bin", "nvcc")
    return candidate if os.path.exists(candidate) else shutil.which("nvcc")


def setup_nvcc_flags() -> list[str]:
    """setup.py's NVCC_FLAGS, read without running setup.py."""
    with open(os.path.join(ROOT, "setup.py")) as handle:
        tree = ast.parse(handle.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "NVCC_FLAGS" for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    raise RuntimeError("setup.py defines no NVCC_FLAGS list")


def compile_ptx(source: str, out_dir: str, flags: list[str], arch: str = "90") -> str:
    """PTX of `source` (the text of a .cu file) compiled with `flags` plus -lineinfo."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME)")
    cu = os.path.join(out_dir, "probe.cu")
    ptx = os.path.join(out_dir, "probe.ptx")
    with open(cu, "w") as handle:
        handle.write(source)
    command = [nvcc, "-std=c++17", *flags, "-lineinfo", f"-I{CSRC}", f"-arch=sm_{arch}"]
    command += ["-ptx", cu, "-o", ptx]
    subprocess.run(command, check=True, capture_output=True, text=True)
    with open(ptx) as handle:
        return handle.read()


def function_lines(path: str, name: str) -> range:
    """The lines (1-based) of the body of the function `name` defined in `path`."""
    with open(path) as handle:
        lines = handle.read().split("\n")
    for index, line in enumerate(lines):
        if re.search(rf"\b{re.escape(name)}\s*\(", line) and not line.strip().startswith("//"):
            depth, opened = 0, False
            for end in range(index, len(lines)):
                depth += lines[end].count("{") - lines[end].count("}")
                opened = opened or "{" in lines[end]
                if opened and depth == 0:
                    return range(index + 1, end + 2)
    raise RuntimeError(f"{name} not found in {path}")


def marker_line(path: str) -> int:
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if FAST_MARKER in line:
                return number
    raise RuntimeError(f"no line of {path} carries the marker {FAST_MARKER!r}")


@dataclass
class Report:
    fast_exp: int = 0  # ex2 of exp_stream, reached from a streaming function
    accurate_expf: int = 0  # ex2 inside CUDA's accurate expf
    exact_ex2: int = 0  # ex2 of a whole number (CUDA's accurate expm1f)
    rcp_f64: int = 0
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


LOC = re.compile(
    r"^\s*\.loc\s+(\d+)\s+(\d+)\s+\d+"
    r"(?:,\s*function_name\s+\S+?,\s*inlined_at\s+(\d+)\s+(\d+)\s+\d+)?"
)
FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"')


def whole_f32(operand: str, whole: set[str]) -> bool:
    """Whether a PTX f32 operand (register, predicate or immediate) is a whole number."""
    operand = operand.strip()
    if operand.startswith("%p"):  # selp's predicate
        return True
    if operand.startswith("%"):
        return operand in whole
    if re.fullmatch(r"0f[0-9A-Fa-f]{8}", operand):
        value = struct.unpack(">f", bytes.fromhex(operand[2:]))[0]
        return math.isfinite(value) and value == int(value)
    return False


def track_whole(instruction: str, whole: set[str]) -> None:
    """Updates `whole` (the f32 registers holding a whole number) after `instruction`."""
    rounded = ROUND_TO_INTEGER.match(instruction)
    if rounded:
        whole.add(rounded.group(1))
        return
    kept = KEEPS_INTEGER.match(instruction)
    if kept:
        target, operands = kept.group(1), kept.group(2).split(",")
        if all(whole_f32(o, whole) for o in operands):
            whole.add(target)
        else:
            whole.discard(target)
        return
    written = re.match(r"^\S+\s+(%f\d+),", instruction)
    if written:
        whole.discard(written.group(1))


def check_ptx(ptx: str, csrc: str = CSRC) -> Report:
    """Applies the module's rules to `ptx` (compiled with -lineinfo from sources under csrc)."""
    csrc = os.path.realpath(csrc)
    lines = ptx.split("\n")
    files = {int(m.group(1)): os.path.realpath(m.group(2)) for m in map(FILE.match, lines) if m}
    fast_file = os.path.realpath(os.path.join(csrc, "kernels/cuda/common.cuh"))
    fast_line = marker_line(fast_file)
    allowed_callers = {
        (os.path.realpath(os.path.join(csrc, path)), line)
        for path, name in STREAMING_FUNCTIONS
        for line in function_lines(os.path.join(csrc, path), name)
    }
    report = Report()
    location: tuple | None = None  # (file, line, inlined_at file, inlined_at line)
    caller_of: dict = {}  # (file, line) -> the (file, line) it was last inlined at
    recent: list[str] = []
    whole: set[str] = set()  # f32 registers that hold a whole number
    for text in lines:
        if text.startswith(".visible .entry") or text.startswith(".entry"):
            caller_of.clear()
            whole.clear()
        loc = LOC.match(text)
        if loc:
            where = (files.get(int(loc.group(1)), loc.group(1)), int(loc.group(2)))
            at = None
            if loc.group(3):
                at = (files.get(int(loc.group(3)), loc.group(3)), int(loc.group(4)))
                caller_of[where] = at
            location = (*where, at)
            continue
        instruction = text.strip()
        if not instruction or instruction.startswith(("//", ".", "$", "{", "}")):
            continue
        recent = (recent + [instruction])[-EXPF_WINDOW:]
        source = "unknown" if location is None else f"{location[0]}:{location[1]}"
        forbidden = FORBIDDEN.search(instruction)
        if forbidden:
            report.violations.append(f"{forbidden.group(1)} at {source}")
            continue
        if "rcp.approx.ftz.f64" in instruction:
            report.rcp_f64 += 1
            continue
        if not EX2_F32.search(instruction):
            track_whole(instruction, whole)
            continue
        operand = re.search(r",\s*(\S+?);", instruction)
        exact = operand is not None and whole_f32(operand.group(1), whole)
        track_whole(instruction, whole)  # the ex2's own result is no whole number
        if exact:
            report.exact_ex2 += 1
            continue
        if location is None:
            report.violations.append(f"ex2.approx with no source line: {instruction}")
            continue
        path, line, _ = location
        before = recent[:-1]
        if any(i.startswith("fma.rm.f32") for i in before) and any(LOG2E_LOW in i for i in before):
            report.accurate_expf += 1
        elif (path, line) == (fast_file, fast_line):
            chain, seen, here = [], set(), (path, line)
            while here in caller_of and here not in seen:
                seen.add(here)
                here = caller_of[here]
                chain.append(here)
            if any(step in allowed_callers for step in chain):
                report.fast_exp += 1
            else:
                called_from = ", ".join(f"{os.path.relpath(p, csrc)}:{n}" for p, n in chain)
                report.violations.append(
                    f"exp_stream reached outside {[n for _, n in STREAMING_FUNCTIONS]}: "
                    f"via {called_from or 'an unknown caller'}"
                )
        else:
            report.violations.append(
                f"{EX2_F32.search(instruction).group(0)} at {source}: neither exp_stream nor "
                "CUDA's accurate expf"
            )
    return report


def check_kernels(arch: str = "90", extra_flags: tuple[str, ...] = ()) -> Report:
    """Compiles every kernel with setup.py's flags (+ extra_flags) and checks the PTX."""
    with tempfile.TemporaryDirectory(prefix="opd-ptx-") as work:
        ptx = compile_ptx(PROBE, work, setup_nvcc_flags() + list(extra_flags), arch)
    return check_ptx(ptx)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="90", help="compute capability, e.g. 80 or 90")
    args = parser.parse_args()
    report = check_kernels(args.arch)
    print(
        f"sm_{args.arch}: {report.fast_exp} fast exps (exp_stream, streaming pass), "
        f"{report.accurate_expf} ex2 inside accurate expf, {report.exact_ex2} exact ex2 of "
        f"whole numbers (expm1f), {report.rcp_f64} f64 rcp seeds, "
        f"{len(report.violations)} violations"
    )
    for violation in sorted(set(report.violations)):
        print("  VIOLATION", violation)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
