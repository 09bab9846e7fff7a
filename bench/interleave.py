"""Torch work run between timed calls (--interleave of bench_opd.py and bench_linear.py).

In a training loop other torch work always runs between two calls of the loss: the model's
layers, the optimizer, allocations. An op can be fast back to back and slow there (issue 25:
on a VM whose host takes back freed memory, a fresh gradient faulted in 0.06 s right after the
last one was freed and 0.6-1.8 s after other work). Each kind below is run, untimed, before
every timed (and warm-up) call:

  off      nothing: back to back
  eager    torch.log_softmax of the (N, V) teacher logits, eager, under no_grad: torch's
           intra-op threads, and one fresh (N, V) tensor allocated, written and freed
  compile  a torch.compile'd reduction over both (N, V) inputs (inductor's generated OpenMP
           code; a (N,) result, so no large allocation); compiled before timing
  alloc    torch.full_like(student, 1.0): a fresh (N, V) tensor written and freed, no reading
"""

from __future__ import annotations

from typing import Callable

import torch

KINDS = ("off", "eager", "compile", "alloc")


def _compiled_reduction(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (torch.softmax(teacher.float(), dim=-1) * student.float()).sum(dim=-1)


def make_interleave(kind: str, student: torch.Tensor, teacher: torch.Tensor) -> Callable[[], None]:
    """A function running one round of `kind` work on (N, V) tensors shaped like the inputs.

    student, teacher: (N, V) (the benchmark's inputs; only read).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown interleave kind {kind!r}; expected one of {KINDS}")
    student, teacher = student.detach(), teacher.detach()
    if kind == "off":
        return lambda: None
    if kind == "eager":

        def eager() -> None:
            with torch.no_grad():
                torch.log_softmax(teacher, dim=-1)

        return eager
    if kind == "alloc":

        def alloc() -> None:
            with torch.no_grad():
                torch.full_like(student, 1.0)

        return alloc
    compiled = torch.compile(_compiled_reduction, dynamic=False)
    with torch.no_grad():
        compiled(student, teacher)  # compiles (untimed)

    def compiled_work() -> None:
        with torch.no_grad():
            compiled(student, teacher)

    return compiled_work
