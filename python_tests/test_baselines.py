"""The benchmark's careful eager baseline (bench/baselines.py) against opd_fast.opd_loss.

The benchmark's headline ratios compare the op with this baseline, so it must compute the same
thing: the same loss and the same gradient for every variant and estimator, with masks,
temperatures, -inf entries, empty overlap / non-overlap sets, in fp32 and fp64. The inputs
have no ties among the top-k candidates (torch.topk orders ties arbitrarily; the op takes the
lower id), so the sets agree.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import VARIANT_ESTIMATORS

import opd_fast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from baselines import careful_opd_loss  # noqa: E402  (bench/ is not a package)

ROWS, VOCAB, K = 11, 97, 5
# (rtol, atol) on the loss and on the gradient, which is O(1 / ROWS)
TOLERANCES = {torch.float64: (1e-9, 1e-12), torch.float32: (2e-4, 2e-5)}


def make_case(dtype, seed=0):
    """Student and correlated teacher logits (ROWS, VOCAB) with the awkward rows the op's
    conventions cover: teacher = student (empty non-overlap), teacher = -student (empty
    overlap), masked vocabulary (-inf in both), and a sampled id per row."""
    generator = torch.Generator().manual_seed(seed)
    student = 2.0 * torch.randn(ROWS, VOCAB, generator=generator, dtype=torch.float64)
    teacher = student + torch.randn(ROWS, VOCAB, generator=generator, dtype=torch.float64)
    teacher[1] = student[1]
    teacher[2] = -student[2]
    masked_columns = torch.randperm(VOCAB, generator=generator)[:30]
    student[3, masked_columns] = float("-inf")
    teacher[3, masked_columns] = float("-inf")
    sampled_ids = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    sampled_ids[3] = int(torch.isfinite(student[3]).nonzero()[0])
    mask = torch.rand(ROWS, generator=generator) > 0.3
    mask[:4] = True  # keep the awkward rows
    return student.to(dtype), teacher.to(dtype), sampled_ids, mask


def loss_and_grad(fn, student, teacher, **options):
    student = student.detach().clone().requires_grad_(True)
    loss = fn(student, teacher, **options)
    (grad,) = torch.autograd.grad(loss, student)
    return loss.detach(), grad


def op_loss(student, teacher, **options):
    return opd_fast.opd_loss(student, teacher, **options).loss


def assert_close(actual, expected, dtype, what):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("use_mask", [False, True], ids=["all_rows", "mask"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("variant,estimator", VARIANT_ESTIMATORS)
def test_careful_matches_op(variant, estimator, temperature, use_mask, dtype, single_thread):
    student, teacher, sampled_ids, mask = make_case(dtype)
    options = dict(
        k=K,
        variant=variant,
        estimator=estimator,
        temperature=temperature,
        mask=mask if use_mask else None,
        sampled_ids=sampled_ids,
    )
    expected_loss, expected_grad = loss_and_grad(op_loss, student, teacher, **options)
    loss, grad = loss_and_grad(careful_opd_loss, student, teacher, **options)
    assert torch.isfinite(expected_loss)
    assert_close(loss, expected_loss, dtype, f"{variant}/{estimator} loss")
    assert_close(grad, expected_grad, dtype, f"{variant}/{estimator} gradient")
    if use_mask:
        assert (grad[~mask] == 0).all(), "masked rows must get no gradient"


def test_variants_are_told_apart(single_thread):
    """The inputs above give every (variant, estimator) its own loss, so a baseline that got
    a set or an estimator wrong could not pass test_careful_matches_op by accident."""
    student, teacher, sampled_ids, _ = make_case(torch.float64)
    losses = {}
    for variant, estimator in VARIANT_ESTIMATORS:
        if variant == "full_vocab" and estimator != "pg":
            continue  # the same computation as full_vocab / pg by definition (A = V: no tail)
        losses[(variant, estimator)] = float(
            careful_opd_loss(
                student, teacher, k=K, variant=variant, estimator=estimator, sampled_ids=sampled_ids
            )
        )
    values = sorted(losses.values())
    gaps = [b - a for a, b in zip(values, values[1:])]
    assert min(gaps) > 1e-6, losses


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(variant="top_k"), "unknown variant"),
        (dict(estimator="reinforce"), "unknown estimator"),
        (dict(variant="sampled_token", estimator="exact"), "no form"),
        (dict(variant="sampled_token"), "needs sampled_ids"),
        (dict(k=0), "k must be in"),
        (dict(k=VOCAB + 1), "k must be in"),
    ],
)
def test_bad_arguments_are_named(options, message):
    student, teacher, _, _ = make_case(torch.float32)
    with pytest.raises(ValueError, match=message):
        careful_opd_loss(student, teacher, **options)
