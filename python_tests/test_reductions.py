"""The op's bookkeeping (opd_fast.op.reductions) against the reference's own reductions:
values, the row weights they stand for, token weights (importance-sampling weights) on both
losses, the one chunked pass a token-weighted fused loss takes, the split reduction the trainer
sums over micro-batches, and the custom ops' inputs named the way their schemas name them."""

from __future__ import annotations

import pytest
import torch

import opd_fast
from opd_fast.op import kernels, linear, reductions, reference

REDUCTIONS = ["token_mean", "seq_mean_token_sum", "sum", "none"]


def _rows(seed=0, shape=(3, 5)):
    generator = torch.Generator().manual_seed(seed)
    count = shape[0] * shape[1]
    loss_rows = torch.randn(count, generator=generator, dtype=torch.float64)
    valid = torch.rand(count, generator=generator) > 0.3
    loss_rows[~valid] = float("nan")  # what invalid rows hold must not leak
    weights = torch.rand(shape, generator=generator, dtype=torch.float64) * 2
    return loss_rows, valid, weights


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_reduce_rows_matches_the_reference(reduction, weighted):
    loss_rows, valid, weights = _rows()
    token_weights = weights if weighted else None
    ours = reductions.reduce_rows(loss_rows, valid, reduction, (3, 5), token_weights)
    theirs = reference.reduce_rows(loss_rows, valid, reduction, (3, 5), token_weights)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    assert not torch.isnan(ours).any()


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean_token_sum", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_row_weights_are_the_gradient_of_the_reduction(reduction, weighted):
    loss_rows, valid, weights = _rows(seed=1)
    loss_rows = torch.where(valid, loss_rows, 0.0).requires_grad_(True)
    token_weights = weights if weighted else None
    reduced = reference.reduce_rows(loss_rows, valid, reduction, (3, 5), token_weights)
    (gradient,) = torch.autograd.grad(reduced, loss_rows)
    ours = reductions.row_weights(valid, reduction, (3, 5), torch.float64, token_weights)
    torch.testing.assert_close(ours, gradient, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="row weights exist for"):
        reductions.row_weights(valid, "none", (3, 5), torch.float64)


def _problem(seed=2, batch=2, length=6, hidden=8, vocab=40):
    generator = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(batch, length, hidden, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64)
    teacher = torch.randn(batch, length, vocab, generator=generator, dtype=torch.float64)
    mask = torch.rand(batch, length, generator=generator) > 0.3
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    weights = torch.rand(batch, length, generator=generator, dtype=torch.float64) * 2
    return hidden_states, weight, teacher, mask, ids, weights


def _expected(logits, teacher, mask, ids, weights, reduction, settings):
    """Value and logit gradient of the weighted loss, built by hand from the reference's
    per-token losses: sum over valid tokens of w_t * loss_t, reduced."""
    logits = logits.detach().requires_grad_(True)
    per_token, _, _ = reference.opd_loss(
        logits, teacher, mask=mask, sampled_ids=ids, reduction="none", **settings
    )
    scale = weights * mask
    if reduction == "token_mean":
        scale = scale / mask.sum()
    elif reduction == "seq_mean_token_sum":
        scale = scale / mask.shape[0]
    value = (per_token * scale).sum()
    (gradient,) = torch.autograd.grad(value, logits)
    return value.detach(), gradient


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean_token_sum", "sum"])
@pytest.mark.parametrize("estimator", ["pg", "exact"])
def test_token_weights_on_both_losses(reduction, estimator):
    """opd_loss and linear_opd_loss with token_weights give the hand-built weighted loss and
    its gradient (the fused one through the hidden states and the weight)."""
    hidden, weight, teacher, mask, ids, weights = _problem()
    settings = dict(k=4, variant="student_topk", estimator=estimator, temperature=0.8)
    logits = hidden @ weight.T
    value, logit_gradient = _expected(logits, teacher, mask, ids, weights, reduction, settings)

    student = logits.detach().requires_grad_(True)
    out = opd_fast.opd_loss(
        student, teacher, mask=mask, sampled_ids=ids, reduction=reduction,
        token_weights=weights, **settings,
    )  # fmt: skip
    (gradient,) = torch.autograd.grad(out.loss, student)
    torch.testing.assert_close(out.loss, value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gradient, logit_gradient, rtol=1e-9, atol=1e-12)

    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    fused = opd_fast.linear_opd_loss(
        h, w, teacher, mask=mask, sampled_ids=ids, reduction=reduction, token_weights=weights,
        chunk_tokens=5, **settings,
    )  # fmt: skip
    grad_h, grad_w = torch.autograd.grad(fused.loss, (h, w))
    torch.testing.assert_close(fused.loss, value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_h, logit_gradient @ weight, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        grad_w, logit_gradient.reshape(-1, 40).T @ hidden.reshape(-1, 8), rtol=1e-9, atol=1e-12
    )


def test_weighted_fused_loss_takes_one_chunked_pass(monkeypatch):
    """Token weights are folded into the row weights: the backward scales the gradient the
    forward computed, no second chunked pass (reduction='none' still needs one)."""
    hidden, weight, teacher, mask, ids, weights = _problem()
    calls = []
    real = linear._chunked_pass
    monkeypatch.setattr(linear, "_chunked_pass", lambda args: calls.append(1) or real(args))
    for reduction, passes in (("sum", 1), ("none", 2)):
        calls.clear()
        h = hidden.clone().requires_grad_(True)
        out = opd_fast.linear_opd_loss(
            h, weight, teacher, mask=mask, sampled_ids=ids, reduction=reduction,
            token_weights=weights, k=4, chunk_tokens=5,
        )  # fmt: skip
        out.loss.sum().backward()
        assert len(calls) == passes, reduction


def test_bad_token_weights_are_named():
    hidden, weight, teacher, mask, ids, weights = _problem()
    logits = hidden @ weight.T
    with pytest.raises(ValueError, match="token_weights must have the logits' leading shape"):
        opd_fast.opd_loss(logits, teacher, k=4, token_weights=weights[:1])
    with pytest.raises(TypeError, match="token_weights must be a floating tensor"):
        opd_fast.linear_opd_loss(hidden, weight, teacher, k=4, token_weights=mask)


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean_token_sum"])
def test_split_reduction_adds_up_to_the_whole_batch(reduction):
    """Parts reduced with part_reduction and scaled add up to the whole batch's reduction."""
    loss_rows, valid, _ = _rows(seed=3, shape=(6, 4))
    whole = reference.reduce_rows(loss_rows, valid, reduction, (6, 4))
    split = reductions.SplitReduction(reduction, int(valid.sum()), 6)
    total = 0.0
    for start in (0, 2, 5):  # uneven parts
        end = {0: 2, 2: 5, 5: 6}[start]
        part_rows, part_valid = loss_rows[start * 4 : end * 4], valid[start * 4 : end * 4]
        part = reductions.reduce_rows(part_rows, part_valid, split.part_reduction, (end - start, 4))
        total = total + split.scale(part)
    torch.testing.assert_close(total, whole, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("op", "inputs"),
    [
        ("opd_forward", kernels.ForwardInputs),
        ("opd_forward_sparse", kernels.SparseForwardInputs),
        ("linear_opd_forward", linear.LinearOpInputs),
    ],
)
def test_op_inputs_are_named_as_their_schemas(op, inputs):
    """Fake kernels and autograd read the ops' inputs by these names: they must be the
    schema's, in its order."""
    schema = getattr(torch.ops.opd_fast, op).default._schema
    assert [argument.name for argument in schema.arguments] == list(inputs._fields)
