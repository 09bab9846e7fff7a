"""Check the CUDA kernels without a GPU: compile their source for the host with an emulation of
the CUDA features they use (emu_prelude.h: a std::thread per CUDA thread, real barriers for
__syncthreads and the warp intrinsics) and compare every output with the CPU op, case by case.

    python tools/cuda_emulator/check.py            # all cases (a few minutes on 2 cores)
    python tools/cuda_emulator/check.py --quick    # one case per group
    python tools/cuda_emulator/check.py --device-math   # the device-numerics cases with the
                                                        # fast paths' documented errors

Needs g++ with C++20 (<barrier>), the CUDA headers ($CUDA_HOME/include, default /usr/local/cuda)
and an installed opd_fast (its CPU op is the reference). It checks the kernels' arithmetic,
indexing, alignment handling and barrier discipline, not their speed or the launch code.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np
import torch

import opd_fast  # noqa: F401  (registers the ops)
from opd_fast import ESTIMATORS, VARIANTS  # in the kernels' enum order

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "python_tests"))  # fmt: skip
import numerics_cases as numerics  # noqa: E402  (the device-numerics cases and their bound)

# The device arithmetic's documented errors, emulated (emu_prelude.h): each result that far
# above the exact value, below it, or either way by a hash of the argument.
DEVICE_MATH_MODES = ("high", "low", "hash")
# Rows per device-math case (the GPU test runs all of them): an emulated row costs ~0.2 s.
DEVICE_MATH_ROWS = 8

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = os.path.join(HERE, "..", "..", "csrc", "kernels")
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
INF, NAN = float("inf"), float("nan")
ops = torch.ops.opd_fast


def host_headers(out_dir: str) -> str:
    """csrc/kernels as kernels/ under out_dir, with what the host cannot compile replaced:
    dynamic shared memory becomes a static buffer and the <<<...>>> launchers are dropped."""
    for sub in ("", "cuda"):
        os.makedirs(os.path.join(out_dir, "kernels", sub), exist_ok=True)
        for name in os.listdir(os.path.join(KERNELS, sub)):
            if not name.endswith((".h", ".cuh")):
                continue
            with open(os.path.join(KERNELS, sub, name)) as handle:
                text = handle.read()
            text = text.replace(
                "extern __shared__ __align__(16) unsigned char dynamic_smem_bytes[];",
                "unsigned char* dynamic_smem_bytes = g_dynamic_smem;",
            )
            if "// Launchers" in text:
                begin = text.index("// Launchers")
                text = text[:begin] + "\n" + text[text.index("}  // namespace kernels") :]
            with open(os.path.join(out_dir, "kernels", sub, name), "w") as handle:
                handle.write(text)
    return out_dir


def build(work: str) -> dict[str, str]:
    include = host_headers(os.path.join(work, "include"))
    cuda = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")
    binaries = {}
    for name in ("forward_harness", "sparse_harness"):
        binary = os.path.join(work, name)
        command = ["g++", "-std=c++20", "-O2", "-pthread", f"-I{HERE}", f"-I{include}"]
        command += [f"-I{cuda}", os.path.join(HERE, f"{name}.cpp"), "-o", binary]
        subprocess.run(command, check=True)
        binaries[name] = binary
    return binaries


def raw(tensor: torch.Tensor) -> bytes:
    size = tensor.element_size()
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
    return tensor.contiguous().view(view).numpy().tobytes()


class Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, count: int, dtype) -> torch.Tensor:
        array = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
        self.pos += count * np.dtype(dtype).itemsize
        return torch.from_numpy(array.copy())


def harness(binary: str, work: str, payload: bytes, math: str = "exact") -> Reader | None:
    """Runs a harness on one case file; math: the device arithmetic (OPD_EMU_MATH)."""
    case_in, case_out = os.path.join(work, "case.bin"), os.path.join(work, "out.bin")
    with open(case_in, "wb") as handle:
        handle.write(payload)
    env = {**os.environ, "OPD_EMU_MATH": math}
    result = subprocess.run([binary, case_in, case_out], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        print("  harness failed:", result.stderr[-1000:])
        return None
    with open(case_out, "rb") as handle:
        return Reader(handle.read())


FORWARD_OUTPUTS = ("loss", "metrics", "student_lse", "teacher_lse", "grad_scale", "sparse_id",
                   "sparse_coef", "student_max", "student_log_norm")  # fmt: skip


def close(name, what, got, want, tol) -> bool:
    if got.dtype == torch.int64:
        ok = torch.equal(got, want)
    else:
        ok = bool(
            torch.isclose(got.double(), want.double(), rtol=tol, atol=tol, equal_nan=True).all()
        )
    if not ok:
        print(f"  MISMATCH {name} {what}: got {got.flatten()[:6]} want {want.flatten()[:6]}")
    return ok


def all_close(name, whats, got, want, tol) -> bool:
    """close() for each output (all of them, so that every mismatch is printed)."""
    return all([close(name, what, g, w, tol) for what, g, w in zip(whats, got, want)])


def acc_types(dtype):
    """The accumulation dtype of logits of `dtype` (torch and numpy) and its tolerance."""
    if dtype == torch.float64:
        return torch.float64, np.float64, 1e-9
    return torch.float32, np.float32, 2e-5


def padded(x, offset, pad):
    """x (N, V) copied into a buffer at element `offset`, rows `pad` elements apart: (the
    buffer, the (N, V) view of it)."""
    rows, vocab = x.shape
    big = torch.zeros(rows * (vocab + pad) + offset + 8, dtype=x.dtype)
    view = big[offset : offset + rows * (vocab + pad)].view(rows, vocab + pad)[:, :vocab]
    view.copy_(x)
    return big, view


def case_header(student, k, variant, estimator, sampled, valid) -> list:
    """The header words both harnesses start with (harness_main.h)."""
    rows, vocab = student.shape
    header = [DTYPE_CODES[student.dtype], rows, vocab, k, VARIANTS.index(variant)]
    return header + [ESTIMATORS.index(estimator), int(sampled is not None), int(valid is not None)]


def row_bytes(tensor, rows, dtype) -> bytes:
    """An optional (N,) input as the harness reads it: zeros (or all rows valid) when absent."""
    if tensor is None:
        tensor = torch.full((rows,), dtype == torch.bool, dtype=dtype)
    array = tensor.numpy()
    return (array.astype(np.uint8) if dtype == torch.bool else array).tobytes()


def take_forward_outputs(out, rows, width, np_acc) -> list:
    """The nine forward outputs, in FORWARD_OUTPUTS order."""
    got = [out.take(rows, np_acc), out.take(rows * 10, np_acc).reshape(rows, 10)]
    got += [out.take(rows, np_acc) for _ in range(3)]
    got.append(out.take(rows * width, np.int64).reshape(rows, width))
    got.append(out.take(rows * width, np_acc).reshape(rows, width))
    got += [out.take(rows, np_acc) for _ in range(2)]
    return got


def forward_payload(student, teacher, k, variant, estimator, temperature, sampled, valid,
                    layout, grad_loss=None, chain=False):  # fmt: skip
    """The forward harness's case file, and the CPU op's forward outputs on the same views.
    grad_loss: the backward's upstream gradient per row (default random, every third row 0);
    chain: the backward runs from the emulated forward's outputs, not the CPU op's."""
    rows, vocab = student.shape
    s_off, s_pad, t_off, t_pad, g_off = layout
    s_big, s_view = padded(student, s_off, s_pad)
    t_big, t_view = padded(teacher, t_off, t_pad)
    forward = ops.opd_forward(s_view, t_view, sampled, valid, k, variant, estimator, temperature)
    _, _, _, _, grad_scale, sparse_id, sparse_coef, student_max, student_log_norm = forward
    acc, _, _ = acc_types(student.dtype)
    if grad_loss is None:
        grad_loss = torch.randn(rows, dtype=acc)
        grad_loss[::3] = 0
    full = variant == "full_vocab"
    header = case_header(student, k, variant, estimator, sampled, valid)
    header += [s_off, vocab + s_pad, t_off, vocab + t_pad, s_big.numel(), t_big.numel(), 2 * k]
    header += [int(full), g_off, int(chain)]
    payload = struct.pack("<18q", *header) + struct.pack("<d", temperature)
    payload += raw(s_big) + raw(t_big)
    payload += row_bytes(sampled, rows, torch.long) + row_bytes(valid, rows, torch.bool)
    for tensor in (grad_loss, student_max, student_log_norm, grad_scale, sparse_id, sparse_coef):
        payload += tensor.numpy().tobytes()
    return payload, forward, (s_view, t_view, grad_loss)


def take_gradient(out, student) -> torch.Tensor:
    rows, vocab = student.shape
    raw_grad = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}[student.element_size()]
    return out.take(rows * vocab, raw_grad).view(student.dtype).reshape(rows, vocab)


def forward_case(binaries, work, student, teacher, k, variant, estimator, temperature,
                 sampled=None, valid=None, layout=(0, 0, 0, 0, 0), name=""):  # fmt: skip
    """Forward and backward kernels vs the CPU op. layout = (s_off, s_pad, t_off, t_pad, g_off):
    the logits sit at element offsets s_off, t_off in rows padded by s_pad, t_pad, and the
    gradient at g_off, to vary alignment."""
    rows, _ = student.shape
    payload, forward, (s_view, t_view, grad_loss) = forward_payload(
        student, teacher, k, variant, estimator, temperature, sampled, valid, layout
    )
    _, _, _, _, grad_scale, sparse_id, sparse_coef, student_max, student_log_norm = forward
    _, np_acc, tol = acc_types(student.dtype)
    full = variant == "full_vocab"
    grad_want = ops.opd_backward(grad_loss, s_view, t_view, student_max, student_log_norm,
                                 grad_scale, sparse_id, sparse_coef, temperature, full,
                                 estimator == "tail")  # fmt: skip
    out = harness(binaries["forward_harness"], work, payload)
    if out is None:
        return False
    got = take_forward_outputs(out, rows, 2 * k, np_acc)
    grad = take_gradient(out, student)
    ok = all_close(name, FORWARD_OUTPUTS, got, forward, tol)
    grad_tol = {torch.float32: 2e-5, torch.float64: 1e-9, torch.bfloat16: 1e-2, torch.float16: 2e-3}
    return close(name, "grad", grad, grad_want, grad_tol[student.dtype]) and ok


def sparse_case(binaries, work, student, teacher, k, variant, estimator, temperature,
                sampled=None, valid=None, corrupt=False, name=""):  # fmt: skip
    """Sparse-teacher forward and row_topk kernels vs the CPU ops, on a payload built from the
    teacher's logits (corrupt: out-of-range teacher ids, as a broken server might send)."""
    rows, vocab = student.shape
    acc, np_acc, tol = acc_types(student.dtype)
    student_ids, student_log_p, student_lse, student_entropy = ops.row_topk(student, k, temperature)
    teacher_ids, teacher_log_q, teacher_lse, teacher_entropy = ops.row_topk(teacher, k, temperature)
    log_q = teacher.to(acc) / temperature - teacher_lse[:, None]
    log_q_at_student = log_q.gather(1, student_ids)
    if corrupt:
        teacher_ids = teacher_ids.clone()
        teacher_ids[0, 0], teacher_ids[-1, 1] = vocab + 5, -3
    sampled_log_q = None
    if sampled is not None:
        sampled_log_q = log_q.gather(1, sampled.clamp(0, vocab - 1)[:, None])[:, 0]
    payload_tensors = (student_ids, teacher_ids, teacher_log_q, log_q_at_student, teacher_entropy)
    want = ops.opd_forward_sparse(student, *payload_tensors, sampled, sampled_log_q, valid, k,
                                  variant, estimator, temperature)  # fmt: skip
    header = case_header(student, k, variant, estimator, sampled, valid)
    payload = struct.pack("<8q", *header) + struct.pack("<d", temperature)
    payload += raw(student) + b"".join(tensor.numpy().tobytes() for tensor in payload_tensors)
    payload += row_bytes(sampled, rows, torch.long) + row_bytes(sampled_log_q, rows, acc)
    payload += row_bytes(valid, rows, torch.bool)
    out = harness(binaries["sparse_harness"], work, payload)
    if out is None:
        return False
    got = take_forward_outputs(out, rows, 2 * k, np_acc)
    topk = [out.take(rows * k, np.int64).reshape(rows, k)]
    topk += [out.take(rows * k, np_acc).reshape(rows, k), out.take(rows, np_acc)]
    topk.append(out.take(rows, np_acc))
    ok = all_close(name, FORWARD_OUTPUTS, got, want, tol)
    topk_want = (student_ids, student_log_p, student_lse, student_entropy)
    topk_names = ("topk ids", "topk log_probs", "topk lse", "topk entropy")
    return all_close(name, topk_names, topk, topk_want, tol) and ok


def case(name, student, teacher, k, variant, estimator, temperature=1.0, **extra) -> dict:
    return dict(name=name, student=student, teacher=teacher, k=k, variant=variant,
                estimator=estimator, temperature=temperature, **extra)  # fmt: skip


def confident_rows(dtype, teacher_too=True):
    """(student, teacher) rows whose top few ids hold all but ~1e-3 .. 1e-9 of the mass (and
    one row masked past id 5): the tail estimator's pass over the rest of the row. A payload's
    teacher rest is 1 - its shipped mass, which such a teacher leaves as rounding noise (one
    the CPU and the device round differently): `teacher_too=False` keeps the teacher spread."""
    s, t = torch.randn(4, 700), torch.randn(4, 700)
    for row, margin in enumerate((8.0, 14.0, 22.0, 30.0)):
        s[row, [0, 3, 5]] += margin
        if teacher_too:
            t[row, [0, 1, 3]] += margin - 1
    s[3, 6:] = -INF
    return s.to(dtype), t.to(dtype)


def forward_cases(quick: bool):
    """Forward/backward cases: every dtype x variant x estimator, k across the kernel's slot
    sizes, ties, signed zeros, -inf masks, NaN rows, sampled ids out of range, alignment, long
    rows, adversarial (ascending) rows."""
    torch.manual_seed(1)
    combos = [(v, e) for v in VARIANTS for e in ESTIMATORS if (v, e) != ("sampled_token", "exact")]
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    for dtype in dtypes[:1] if quick else dtypes:
        for variant, estimator in combos[:3] if quick else combos:
            s = (torch.randn(3, 203) * 2).to(dtype)
            t = (s.float() + torch.randn(3, 203)).to(dtype)
            yield case(f"{dtype} {variant} {estimator}", s, t, 16, variant, estimator,
                       sampled=torch.randint(0, 203, (3,)), layout=(1, 0, 1, 0, 1))  # fmt: skip
    if quick:
        return
    sizes = [(1, 50), (5, 5), (31, 97), (32, 300), (33, 300), (64, 500), (65, 500), (100, 700),
             (128, 128), (128, 1500)]  # fmt: skip
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for k, vocab in sizes:
            s, t = (torch.randn(3, vocab) * 2).to(dtype), (torch.randn(3, vocab) * 2).to(dtype)
            yield case(f"{dtype} k={k} V={vocab}", s, t, k, "union_topk", "exact", 0.7)
    for dtype in dtypes:
        s, t = torch.randint(-3, 3, (4, 400)).to(dtype), torch.randint(-2, 2, (4, 400)).to(dtype)
        yield case(f"{dtype} ties", s, t, 16, "union_topk", "pg")
        s = torch.zeros(2, 100, dtype=dtype)
        s[:, ::2] = -0.0
        s[0, 50:] = -1
        t = -s.clone()
        t[1, 7] = -0.0
        yield case(f"{dtype} signed zeros", s, t, 20, "union_topk", "exact")
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        s, t = torch.randn(5, 333).to(dtype), torch.randn(5, 333).to(dtype)
        s[0, ::2], t[0, 1::3] = -INF, -INF  # masked vocabulary
        s[1, 10:], t[1, :300] = -INF, -INF  # fewer than k finite
        s[2, :], t[3, :], s[4, :] = -INF, -INF, NAN  # all -inf rows; an invalid NaN row
        valid = torch.tensor([True, True, True, True, False])
        for variant in ("student_topk", "union_topk", "full_vocab", "overlap_topk"):
            for estimator in ESTIMATORS:
                name = f"{dtype} -inf {variant} {estimator}"
                yield case(name, s, t, 16, variant, estimator, valid=valid)
    nan_variants = [("union_topk", "pg"), ("student_topk", "exact"), ("full_vocab", "pg"),
                    ("overlap_topk", "exact"), ("union_topk", "tail")]  # fmt: skip
    for dtype in dtypes:
        s, t = torch.randn(4, 50).to(dtype), torch.randn(4, 50).to(dtype)
        s[0, 5:] = NAN  # fewer orderable entries than k
        t[1, :] = NAN
        s[2, ::2], t[2, 1::2] = NAN, NAN
        s[3, :40], s[3, 40:45] = NAN, -INF
        for variant, estimator in nan_variants:
            yield case(f"{dtype} NaN rows {variant} {estimator}", s, t, 16, variant, estimator,
                       sampled=torch.tensor([1, 2, 3, 49]))  # fmt: skip
        invalid = torch.zeros(4, dtype=torch.bool)
        yield case(f"{dtype} all rows invalid", s, t, 16, "union_topk", "pg", valid=invalid)
    for dtype in (torch.float32, torch.float16):
        s, t = torch.randn(4, 120).to(dtype), torch.randn(4, 120).to(dtype)
        for estimator in ("pg", "tail"):
            yield case(
                f"{dtype} sampled ids out of range {estimator}",
                s,
                t,
                16,
                "sampled_token",
                estimator,
                1.3,
                sampled=torch.tensor([0, 119, -1, 120]),
            )
    for dtype in dtypes:  # tail: sets holding almost all mass (the pass over the rest)
        s, t = confident_rows(dtype)
        for variant in VARIANTS:
            yield case(f"{dtype} confident tail {variant}", s, t, 4, variant, "tail",
                       sampled=torch.tensor([0, 3, 1, 5]), layout=(1, 0, 1, 0, 1))  # fmt: skip
    layouts = [(0, 0, 0, 0, 0), (3, 0, 3, 0, 3), (1, 0, 0, 0, 0), (0, 5, 0, 7, 1)]
    for dtype in dtypes:
        s, t = (torch.randn(3, 1001) * 2).to(dtype), (torch.randn(3, 1001) * 2).to(dtype)
        for s_off, s_pad, t_off, t_pad, g_off in layouts:
            yield case(f"{dtype} alignment {s_off} {s_pad} {t_off} {t_pad} {g_off}", s, t, 16,
                       "full_vocab", "pg", layout=(s_off, s_pad, t_off, t_pad, g_off))  # fmt: skip
    for dtype in (torch.bfloat16, torch.float32):
        s, t = (torch.randn(2, 20011) * 4).to(dtype), (torch.randn(2, 20011) * 4).to(dtype)
        yield case(f"{dtype} V=20011", s, t, 16, "union_topk", "pg", 0.5, layout=(1, 0, 1, 0, 0))
        s = torch.arange(3000).float().repeat(2, 1).to(dtype) * 0.01
        yield case(f"{dtype} ascending rows k=64", s, torch.flip(s, [1]), 64, "union_topk", "exact")


def sparse_cases(quick: bool):
    """Sparse-teacher forward and row_topk cases: dtypes x k x the variants a payload serves,
    -inf / NaN / invalid rows with sampled ids, out-of-range teacher ids, ties."""
    torch.manual_seed(0)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    variants = ["student_topk", "teacher_topk", "overlap_topk", "nonoverlap_topk", "union_topk"]
    sizes = [(1, 40), (16, 300), (33, 257), (128, 1000)]
    for dtype in dtypes[:1] if quick else dtypes:
        for k, vocab in sizes[1:2] if quick else sizes:
            s, t = (torch.randn(3, vocab) * 2).to(dtype), (torch.randn(3, vocab) * 2).to(dtype)
            for variant in variants[:2] if quick else variants:
                for estimator in ESTIMATORS:
                    name = f"{dtype} k={k} V={vocab} {variant} {estimator}"
                    yield case(name, s, t, k, variant, estimator, 0.8)
    if quick:
        return
    for dtype in (torch.float32, torch.bfloat16):
        s, t = torch.randn(5, 333).to(dtype), torch.randn(5, 333).to(dtype)
        s[0, ::2], t[0, 1::3] = -INF, -INF
        s[1, 10:] = -INF
        s[2, 7] = NAN
        valid = torch.tensor([True, True, True, True, False])
        sampled = torch.tensor([0, 332, 5, 17, 2])
        for variant, estimator in [("student_topk", "pg"), ("union_topk", "exact"),
                                   ("sampled_token", "pg")]:  # fmt: skip
            yield case(f"{dtype} edge rows {variant}", s, t, 16, variant, estimator,
                       sampled=sampled, valid=valid)  # fmt: skip
        yield case(f"{dtype} out-of-range teacher ids", s, t, 16, "overlap_topk", "exact",
                   corrupt=True)  # fmt: skip
    for dtype in dtypes:  # tail: the student's set holds almost all of its mass
        s, t = confident_rows(dtype, teacher_too=False)
        for variant in variants + ["sampled_token"]:
            yield case(f"{dtype} confident tail {variant}", s, t, 4, variant, "tail",
                       sampled=torch.tensor([0, 3, 1, 5]))  # fmt: skip
    s, t = torch.randint(-3, 3, (4, 400)).float(), torch.randint(-2, 2, (4, 400)).float()
    yield case("ties", s, t, 16, "union_topk", "pg")


def device_math_case(binaries, work, case, math: str) -> bool:
    """The emulated forward and (chained) backward of one numerics case with the device
    arithmetic `math`, against the fp64 reference: within the device bound of
    python_tests/numerics_cases.py (docs/math.md, Device precision)?"""
    case = dataclasses.replace(case, rows=min(case.rows, DEVICE_MATH_ROWS))
    student, teacher = case.logits()
    bound, (loss64, grad64) = numerics.cpu_bound(case, student, teacher)
    sampled = case.sampled_ids()
    ones = torch.ones(case.rows, dtype=torch.float32)
    payload, _, _ = forward_payload(student, teacher, case.k, case.variant, case.estimator,
                                    case.temperature, sampled, None, (0, 0, 0, 0, 0),
                                    grad_loss=ones, chain=True)  # fmt: skip
    out = harness(binaries["forward_harness"], work, payload, math)
    if out is None:
        return False
    loss = take_forward_outputs(out, case.rows, 2 * case.k, np.float32)[0]
    grad = take_gradient(out, student)
    loss_error, grad_error = numerics.errors(loss.double(), grad.double(), loss64, grad64)
    ok = numerics.within(bound, loss_error, grad_error)
    if case.variant == "full_vocab" or case.estimator == "exact":
        ok = ok and bool((loss >= 0).all())  # a KL, never negative
    grad_text = "-" if bound.grad is None else f"{grad_error:.2e} / {bound.grad:.2e}"
    print(
        f"  {'ok  ' if ok else 'FAIL'} {math:6} {case.name:40} loss {loss_error:.2e} / "
        f"{bound.loss:.2e}  grad {grad_text}"
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one case per group")
    parser.add_argument(
        "--device-math",
        nargs="*",
        metavar="MODE",
        default=None,
        help="only the device-numerics cases, with the device arithmetic's documented errors "
        f"(modes {', '.join(DEVICE_MATH_MODES)}; none given: all three; legacy: the errors "
        "--use_fast_math made, a negative control that is expected to fail)",
    )
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="opd-cuda-emulator-")
    try:
        binaries = build(work)
        results = []
        if args.device_math is not None:
            for math in args.device_math or DEVICE_MATH_MODES:
                passed = total = 0
                for case in numerics.cases(args.quick):
                    ok = device_math_case(binaries, work, case, math)
                    passed, total = passed + ok, total + 1
                print(f"device math {math}: {passed} of {total} cases within the device bound")
                results.append(passed == total)
            return 0 if all(results) else 1
        for group, cases, run in (
            ("forward+backward", forward_cases, forward_case),
            ("sparse forward+row_topk", sparse_cases, sparse_case),
        ):
            passed = total = 0
            for case in cases(args.quick):
                ok = run(binaries, work, **case)
                passed, total = passed + ok, total + 1
                if not ok:
                    print("FAIL", case["name"])
            print(f"{group}: {passed} of {total} cases match the CPU op")
            results.append(passed == total)
        return 0 if all(results) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
