"""torch.autograd.gradcheck of the fused op in fp64.

The loss is piecewise smooth: the top-k sets are constants between set boundaries. Inputs are
well separated (distinct values 0.5 apart, far more than gradcheck's eps = 1e-6), so finite
differences never cross a boundary.

- exact and tail estimators (every variant) and full_vocab (every estimator): the gradient is the
  derivative of the loss value, so gradcheck runs on opd_loss itself (reduction='none', so the
  whole (N, N * V) Jacobian is checked, with per-row upstream gradients).
- pg estimator: the gradient is that of the surrogate -sum_{v in A} c(v) log p(v) with the
  advantages c held constant (OPD_SPEC.md 3b), not of the loss value. gradcheck compares the
  op's backward with finite differences of that surrogate, with c and A computed here from the
  spec's formulas at the evaluation point.
"""

from __future__ import annotations

import pytest
import torch
from conftest import VARIANT_ESTIMATORS

import opd_fast
from opd_fast.op import reference
from opd_fast.op.names import VARIANTS

pytestmark = pytest.mark.usefixtures("single_thread")


def well_separated_logits(rows, vocab, *, seed, k=4, swaps=2, spacing=0.5):
    """Rows are permutations of spacing * arange(V); the teacher's ranking is the student's
    with a swap across the top-k boundary (so the overlap is partial, neither empty nor
    complete) and a few random adjacent swaps inside the top-k, plus a per-row offset."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.empty(rows, vocab, dtype=torch.float64)
    teacher = torch.empty(rows, vocab, dtype=torch.float64)
    levels = spacing * torch.arange(vocab, dtype=torch.float64)
    for row in range(rows):
        order = torch.randperm(vocab, generator=gen)  # order[r] = id with rank r (0 = lowest)
        student[row, order] = levels
        teacher_order = order.clone()
        boundary = vocab - k - 1  # the highest rank outside the student's top-k
        ranks = [boundary] + [
            int(torch.randint(boundary + 1, vocab - 1, (1,), generator=gen)) for _ in range(swaps)
        ]
        for r in ranks:
            teacher_order[[r, r + 1]] = teacher_order[[r + 1, r]]
        teacher[row, teacher_order] = levels * 0.8 + float(torch.randn(1, generator=gen))
    return student, teacher


def _pg_advantages(student, teacher, *, k, variant, temperature, sampled_ids):
    """A_t(v) of OPD_SPEC.md 3b at the given logits, as a dense (N, V) tensor (0 outside A)."""
    log_p = torch.log_softmax(student / temperature, dim=-1)
    log_q = torch.log_softmax(teacher / temperature, dim=-1)
    in_set = reference.loss_set(
        variant,
        reference.topk_mask(student, k),
        reference.topk_mask(teacher, k),
        sampled_ids,
        student.shape[-1],
    )
    if variant == "sampled_token":
        weight = in_set.to(log_p.dtype)
    elif variant in ("nonoverlap_topk", "full_vocab"):
        weight = log_p.exp() * in_set
    else:
        p_in_set = log_p.exp() * in_set
        weight = p_in_set / p_in_set.sum(dim=-1, keepdim=True)
    return torch.where(in_set, weight * (log_q - log_p), torch.zeros_like(log_p))


class _PgSurrogate(torch.autograd.Function):
    """forward: per-row -sum_v c(v) log p(v) with c frozen at z0; backward: the op's gradient."""

    @staticmethod
    def forward(ctx, student, teacher, advantages, kwargs):
        ctx.save_for_backward(student, teacher)
        ctx.kwargs = kwargs
        log_p = torch.log_softmax(student / kwargs["temperature"], dim=-1)
        return -(advantages * log_p).sum(dim=-1)

    @staticmethod
    def backward(ctx, grad_rows):
        student, teacher = ctx.saved_tensors
        with torch.enable_grad():
            leaf = student.detach().requires_grad_(True)
            loss = opd_fast.opd_loss(leaf, teacher, reduction="none", **ctx.kwargs).loss
            (grad,) = torch.autograd.grad(loss, leaf, grad_rows)
        return grad, None, None, None


def _kwargs(variant, estimator, temperature, sampled_ids):
    return dict(
        k=4, variant=variant, estimator=estimator, temperature=temperature, sampled_ids=sampled_ids
    )


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize(
    "variant, estimator",
    [pytest.param(v, e, id=f"{v}-{e}") for v, e in VARIANT_ESTIMATORS],
)
def test_gradcheck(variant, estimator, temperature):
    seed = VARIANT_ESTIMATORS.index((variant, estimator))
    student, teacher = well_separated_logits(4, 12, seed=seed)
    sampled_ids = torch.tensor([0, 5, 11, 3])
    kwargs = _kwargs(variant, estimator, temperature, sampled_ids)
    student.requires_grad_(True)
    if estimator in ("exact", "tail") or variant == "full_vocab":

        def loss_rows(z):
            return opd_fast.opd_loss(z, teacher, reduction="none", **kwargs).loss

        assert torch.autograd.gradcheck(loss_rows, (student,), eps=1e-6, atol=1e-8, rtol=1e-6)
    else:
        advantages = _pg_advantages(
            student.detach(),
            teacher,
            k=4,
            variant=variant,
            temperature=temperature,
            sampled_ids=sampled_ids,
        )
        assert bool((advantages != 0).any()), "the surrogate should not be trivially zero"

        def surrogate_rows(z):
            return _PgSurrogate.apply(z, teacher, advantages, kwargs)

        assert torch.autograd.gradcheck(surrogate_rows, (student,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck_tail_when_the_set_holds_almost_all_mass(variant):
    """Levels 2.5 apart: the top-4 sets hold all but ~1e-4 .. 1e-5 of the mass, so tail takes
    its pass over the rest of the row; its gradient is still that of its value."""
    student, teacher = well_separated_logits(4, 12, seed=5, spacing=2.5)
    kwargs = _kwargs(variant, "tail", 1.0, torch.tensor([0, 5, 11, 3]))
    student.requires_grad_(True)

    def loss_rows(z):
        return opd_fast.opd_loss(z, teacher, reduction="none", **kwargs).loss

    assert torch.autograd.gradcheck(loss_rows, (student,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("variant", ["student_topk", "union_topk", "full_vocab"])
def test_gradcheck_3d_masked_token_mean(variant):
    """(B, T, V) with a mask through the token_mean reduction (exact estimator)."""
    student, teacher = well_separated_logits(6, 10, seed=3, k=3)
    student = student.reshape(2, 3, 10).requires_grad_(True)
    teacher = teacher.reshape(2, 3, 10)
    mask = torch.tensor([[True, False, True], [True, True, False]])

    def loss(z):
        return opd_fast.opd_loss(
            z, teacher, k=3, variant=variant, estimator="exact", mask=mask, temperature=1.3
        ).loss

    assert torch.autograd.gradcheck(loss, (student,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize(
    "variant", ["student_topk", "teacher_topk", "overlap_topk", "nonoverlap_topk", "union_topk"]
)
def test_pg_loss_value_is_not_its_gradient_potential(variant):
    """Guards the premise of the surrogate check above: for the top-k pg variants the op's
    gradient is NOT the derivative of the loss value, so a plain gradcheck must fail."""
    student, teacher = well_separated_logits(3, 12, seed=4)
    student.requires_grad_(True)

    def loss_rows(z):
        return opd_fast.opd_loss(z, teacher, k=4, variant=variant, reduction="none").loss

    assert not torch.autograd.gradcheck(
        loss_rows, (student,), eps=1e-6, atol=1e-8, rtol=1e-6, raise_exception=False
    )


def test_pg_full_vocab_matches_exact_full_vocab():
    """Spec 3b: with w = p over the whole vocabulary the pg value and gradient are KL(p||q)'s."""
    student, teacher = well_separated_logits(5, 20, seed=5)
    results = []
    for estimator in ("pg", "exact"):
        leaf = student.clone().requires_grad_(True)
        loss = opd_fast.opd_loss(leaf, teacher, variant="full_vocab", estimator=estimator).loss
        (grad,) = torch.autograd.grad(loss, leaf)
        results.append((loss, grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-10, atol=1e-14)
