"""Every CUDA kernel of opd_fast once on small shapes, for compute-sanitizer:

    compute-sanitizer --tool racecheck --kernel-name kns=opd_fast python bench/gpu_sanitize.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck ... (one cudaMalloc per
        tensor, so that a read past a row is outside any allocation)

Kernels: the forward (top-k variant with sampled ids and a masked row; full_vocab), the
backward (both forms), row_topk and the sparse-teacher forward, in fp32 and bf16 (4- and
8-element vectors), on an unaligned view with a padded row stride (scalar head and tail) and
on aligned rows with k = 128 (the largest shared-memory sort). The ops are called directly
(torch.ops.opd_fast), without the value checks, so that only opd_fast's kernels and a few
of torch's run. Exits 0 after printing what ran; the sanitizer's exit code says the rest.
"""

from __future__ import annotations

import argparse

import torch

import opd_fast  # noqa: F401  (registers the ops)

ops = torch.ops.opd_fast


def shapes(dtype):
    """(name, student, teacher, k): an unaligned view with padded rows, and aligned rows."""
    generator = torch.Generator().manual_seed(0)
    rows, vocab = 3, 1001
    buffer = torch.randn(2, rows, vocab + 5, generator=generator).to(dtype).cuda()
    yield "unaligned V=1001 k=16", buffer[0, :, 1 : vocab + 1], buffer[1, :, 1 : vocab + 1], 16
    student = torch.randn(2, 300, generator=generator).to(dtype).cuda()
    teacher = (student.float() + torch.randn(2, 300, generator=generator).cuda()).to(dtype)
    yield "aligned V=300 k=128", student, teacher, 128


def run(dtype) -> int:
    launches = 0
    for name, student, teacher, k in shapes(dtype):
        rows, vocab = student.shape
        sampled = torch.arange(rows, device="cuda") * 7 % vocab
        valid = torch.ones(rows, dtype=torch.bool, device="cuda")
        valid[-1] = False
        grad_loss = torch.ones(rows, device="cuda", dtype=torch.float32)
        for variant in ("union_topk", "full_vocab"):
            forward = ops.opd_forward(student, teacher, sampled, valid, k, variant, "pg", 0.9)
            (_, _, _, _, grad_scale, sparse_id, sparse_coef, student_max, log_norm) = forward
            ops.opd_backward(grad_loss, student, teacher, student_max, log_norm, grad_scale,
                             sparse_id, sparse_coef, 0.9, variant == "full_vocab",
                             False)  # fmt: skip
            launches += 2
        student_top = ops.row_topk(student, k, 0.9)
        teacher_top = ops.row_topk(teacher, k, 0.9)
        log_q = teacher.float() / 0.9 - teacher_top[2][:, None]
        ops.opd_forward_sparse(student, student_top[0], teacher_top[0], teacher_top[1],
                               log_q.gather(1, student_top[0]), teacher_top[3], sampled,
                               log_q.gather(1, sampled[:, None])[:, 0], valid, k,
                               "union_topk", "exact", 0.9)  # fmt: skip
        launches += 3
        torch.cuda.synchronize()
        print(f"{str(dtype).removeprefix('torch.')} {name}: forward x2, backward x2, "
              "row_topk x2, sparse forward", flush=True)  # fmt: skip
    return launches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    if not (torch.cuda.is_available() and opd_fast.build_info().get("with_cuda", False)):
        raise SystemExit("needs a CUDA GPU and opd_fast built with its CUDA kernels")
    launches = sum(run(dtype) for dtype in (torch.float32, torch.bfloat16))
    print(f"gpu_sanitize: {launches} opd_fast kernel launches done")


if __name__ == "__main__":
    main()
