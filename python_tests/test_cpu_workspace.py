"""The CPU backward's kept gradient block (csrc/launchers/cpu_workspace.h): a gradient the
caller still holds is never written by a later call, a freed one's memory is reused, and reuse
changes no value."""

from __future__ import annotations

import threading

import pytest
import torch

import opd_fast
from opd_fast import _C


def _inputs(rows=8, vocab=3000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=generator).mul_(2).requires_grad_(True)
    teacher = student.detach() + torch.randn(rows, vocab, generator=generator)
    return student, teacher


def _gradient(student, teacher, **options):
    loss = opd_fast.opd_loss(student, teacher, k=8, **options).loss
    return torch.autograd.grad(loss, student)[0]


@pytest.fixture(autouse=True)
def fresh_workspace():
    _C.release_cpu_workspace()
    yield
    _C.release_cpu_workspace()


def test_a_held_gradient_is_never_overwritten():
    student, teacher = _inputs()
    first = _gradient(student, teacher)
    first_pointer = first.data_ptr()
    kept = first.clone()
    assert _C.cpu_workspace_in_use()
    other_student, other_teacher = _inputs(seed=1)
    second = _gradient(other_student, other_teacher)  # while `first` holds the block
    assert second.data_ptr() != first.data_ptr()
    assert torch.equal(first, kept)
    view = first[2:].view(-1)  # a view alone holds it too
    del first
    third = _gradient(other_student, other_teacher)
    assert third.data_ptr() != first_pointer
    assert torch.equal(view, kept[2:].view(-1))


def test_a_freed_gradient_is_reused_and_reuse_changes_no_value():
    student, teacher = _inputs()
    expected = _gradient(student, teacher).clone()
    pointer = _gradient(student, teacher).data_ptr()  # freed at once
    assert not _C.cpu_workspace_in_use()
    again = _gradient(student, teacher)
    assert again.data_ptr() == pointer
    assert torch.equal(again, expected)
    del again
    summed = _gradient(student, teacher, reduction="sum").clone()
    smaller = _gradient(student[:3].detach().requires_grad_(True), teacher[:3], reduction="sum")
    assert smaller.data_ptr() == pointer  # a smaller gradient uses the same block
    assert torch.equal(smaller, summed[:3])  # rows are independent


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_every_dtype_and_a_growing_block(dtype):
    for rows in (4, 16, 9):
        student, teacher = _inputs(rows=rows)
        student = student.detach().to(dtype).requires_grad_(True)
        teacher = teacher.to(dtype)
        fresh = _gradient(student, teacher)
        assert fresh.dtype == dtype and fresh.shape == student.shape and fresh.is_contiguous()
        held = fresh.clone()
        del fresh
        assert torch.equal(_gradient(student, teacher), held)
    assert _C.cpu_workspace_bytes() >= 16 * 3000 * 2


def test_leaf_gradients_accumulate():
    student, teacher = _inputs()
    expected = _gradient(student, teacher).clone()
    for _ in range(3):
        opd_fast.opd_loss(student, teacher, k=8).loss.backward()
    torch.testing.assert_close(student.grad, 3 * expected, rtol=0, atol=1e-6)


def test_release_frees_only_an_unheld_block():
    student, teacher = _inputs()
    held = _gradient(student, teacher)
    expected = held.clone()
    _C.release_cpu_workspace()  # the gradient keeps its memory until it dies
    assert _C.cpu_workspace_bytes() == 0
    assert torch.equal(held, expected)
    del held
    assert _C.cpu_workspace_bytes() == 0
    _gradient(student, teacher)
    assert _C.cpu_workspace_bytes() == student.numel() * 4


def test_concurrent_calls_each_get_their_own_gradient():
    student, teacher = _inputs(rows=16)
    expected = _gradient(student, teacher).clone()
    results, errors = [], []

    def worker():
        try:
            for _ in range(5):
                grad = _gradient(student, teacher)
                results.append((grad.data_ptr(), torch.equal(grad, expected)))
                held.append(grad)
        except Exception as error:  # surfaced below
            errors.append(error)

    held: list[torch.Tensor] = []
    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert all(equal for _, equal in results)
    assert len({pointer for pointer, _ in results}) == len(results)  # all held: all distinct
