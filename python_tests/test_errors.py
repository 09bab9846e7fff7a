"""Bad inputs give a clear exception that names the problem, through opd_fast.opd_loss and
straight through torch.ops.opd_fast.* (RuntimeError, never a crash or an out-of-bounds read)."""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda

import opd_fast
from opd_fast.op.loss import NonFiniteLogitsError

pytestmark = pytest.mark.usefixtures("single_thread")

ROWS, VOCAB = 4, 10


def logits(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape or (ROWS, VOCAB), generator=gen).to(dtype)


def ids(*shape, high=VOCAB):
    return torch.randint(0, high, shape or (ROWS,), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------
# opd_fast.opd_loss: argument checks
# ---------------------------------------------------------------------------------------------

S, T = logits(seed=0), logits(seed=1)

ARGUMENT_ERRORS = [
    # (id, student, teacher, kwargs, exception, message pattern)
    (
        "shape_mismatch",
        S,
        logits(5, VOCAB),
        {},
        ValueError,
        r"shape mismatch: student_logits \(4, 10\) vs teacher_logits \(5, 10\)",
    ),
    (
        "vocab_mismatch",
        S,
        logits(ROWS, 12),
        {},
        ValueError,
        r"vocabulary mismatch: student_logits has V=10, teacher_logits has V=12",
    ),
    (
        "1d_logits",
        logits(VOCAB),
        logits(VOCAB),
        {},
        ValueError,
        r"student_logits must be \(N, V\) or \(B, T, V\), got shape \(10,\)",
    ),
    (
        "4d_logits",
        logits(1, 2, 3, VOCAB),
        logits(1, 2, 3, VOCAB),
        {},
        ValueError,
        r"must be \(N, V\) or \(B, T, V\)",
    ),
    (
        "teacher_not_tensor",
        S,
        T.tolist(),
        {},
        TypeError,
        r"teacher_logits must be a torch.Tensor, got list",
    ),
    ("k_zero", S, T, {"k": 0}, ValueError, r"k must be in \[1, min\(V, 128\)\], got k=0 with V=10"),
    ("k_negative", S, T, {"k": -3}, ValueError, r"k must be in \[1, min\(V, 128\)\], got k=-3"),
    ("k_above_vocab", S, T, {"k": 11}, ValueError, r"got k=11 with V=10"),
    (
        "k_above_max",
        logits(2, 300),
        logits(2, 300),
        {"k": 129},
        ValueError,
        r"k must be in \[1, min\(V, 128\)\], got k=129 with V=300",
    ),
    ("k_float", S, T, {"k": 4.0}, TypeError, r"k must be an int, got float"),
    ("k_bool", S, T, {"k": True}, TypeError, r"k must be an int, got bool"),
    ("k_tensor", S, T, {"k": torch.tensor(4)}, TypeError, r"k must be an int, got Tensor"),
    (
        "int_logits",
        S.long(),
        T.long(),
        {},
        TypeError,
        r"student_logits must be float32, bfloat16, float16 or float64, got torch.int64",
    ),
    (
        "int_teacher",
        S,
        T.int(),
        {},
        TypeError,
        r"teacher_logits must be float32, bfloat16, float16 or float64, got torch.int32",
    ),
    (
        "mixed_dtypes",
        S,
        T.bfloat16(),
        {},
        TypeError,
        r"dtype mismatch: student_logits is torch.float32, teacher_logits is torch.bfloat16",
    ),
    (
        "meta_device",
        S.to("meta"),
        T.to("meta"),
        {},
        ValueError,
        r"opd_fast runs on cpu and cuda, got meta",
    ),
    (
        "device_mismatch",
        S,
        T.to("meta"),
        {},
        ValueError,
        r"device mismatch: student_logits on cpu, teacher_logits on meta",
    ),
    (
        "mask_shape",
        S,
        T,
        {"mask": torch.ones(ROWS + 1, dtype=torch.bool)},
        ValueError,
        r"mask must have the logits' leading shape \(4,\), got \(5,\)",
    ),
    (
        "mask_3d_shape",
        logits(2, 3, VOCAB),
        logits(2, 3, VOCAB),
        {"mask": torch.ones(3, 2, dtype=torch.bool)},
        ValueError,
        r"mask must have the logits' leading shape \(2, 3\), got \(3, 2\)",
    ),
    (
        "mask_not_tensor",
        S,
        T,
        {"mask": [True] * ROWS},
        TypeError,
        r"mask must be a torch.Tensor, got list",
    ),
    (
        "mask_device",
        S,
        T,
        {"mask": torch.ones(ROWS, dtype=torch.bool, device="meta")},
        ValueError,
        r"mask on meta but logits on cpu",
    ),
    (
        "sampled_ids_shape",
        S,
        T,
        {"sampled_ids": ids(ROWS, 1)},
        ValueError,
        r"sampled_ids must have the logits' leading shape \(4,\), got \(4, 1\)",
    ),
    (
        "sampled_ids_float",
        S,
        T,
        {"sampled_ids": ids().float()},
        TypeError,
        r"sampled_ids must be an integer tensor, got torch.float32",
    ),
    (
        "sampled_ids_bool",
        S,
        T,
        {"sampled_ids": ids() > 3},
        TypeError,
        r"sampled_ids must be an integer tensor, got torch.bool",
    ),
    (
        "sampled_token_without_ids",
        S,
        T,
        {"variant": "sampled_token"},
        ValueError,
        r"variant='sampled_token' needs sampled_ids",
    ),
    (
        "exact_sampled_token",
        S,
        T,
        {"variant": "sampled_token", "estimator": "exact", "sampled_ids": ids()},
        ValueError,
        r"estimator='exact' has no form for variant='sampled_token'",
    ),
    (
        "unknown_variant",
        S,
        T,
        {"variant": "student_top_k"},
        ValueError,
        r"unknown variant 'student_top_k'; expected one of \('student_topk'",
    ),
    (
        "unknown_estimator",
        S,
        T,
        {"estimator": "reinforce"},
        ValueError,
        r"unknown estimator 'reinforce'; expected one of \('pg', 'exact', 'tail'\)",
    ),
    (
        "unknown_reduction",
        S,
        T,
        {"reduction": "mean"},
        ValueError,
        r"unknown reduction 'mean'; expected one of \('token_mean'",
    ),
    (
        "seq_mean_needs_3d",
        S,
        T,
        {"reduction": "seq_mean_token_sum"},
        ValueError,
        r"reduction='seq_mean_token_sum' needs \(B, T, V\) logits",
    ),
    (
        "temperature_zero",
        S,
        T,
        {"temperature": 0.0},
        ValueError,
        r"temperature must be a positive finite number, got 0.0",
    ),
    (
        "temperature_negative",
        S,
        T,
        {"temperature": -1.0},
        ValueError,
        r"temperature must be a positive finite number, got -1.0",
    ),
    (
        "temperature_inf",
        S,
        T,
        {"temperature": float("inf")},
        ValueError,
        r"temperature must be a positive finite number, got inf",
    ),
    (
        "temperature_nan",
        S,
        T,
        {"temperature": float("nan")},
        ValueError,
        r"temperature must be a positive finite number, got nan",
    ),
    (
        "temperature_string",
        S,
        T,
        {"temperature": "1.0"},
        ValueError,
        r"temperature must be a positive finite number, got 1.0",
    ),
]


@pytest.mark.parametrize(
    "student, teacher, kwargs, exception, pattern",
    [pytest.param(*case[1:], id=case[0]) for case in ARGUMENT_ERRORS],
)
def test_argument_errors(student, teacher, kwargs, exception, pattern):
    with pytest.raises(exception, match=pattern):
        opd_fast.opd_loss(student, teacher, **{"k": 4, **kwargs})


@requires_cuda
def test_cpu_cuda_device_mismatch():
    with pytest.raises(
        ValueError,
        match=r"device mismatch: student_logits on cpu, teacher_logits "
        r"on cuda:0",
    ):
        opd_fast.opd_loss(S, T.cuda(), k=4)
    with pytest.raises(ValueError, match=r"sampled_ids on cpu but logits on cuda:0"):
        opd_fast.opd_loss(S.cuda(), T.cuda(), k=4, sampled_ids=ids())
    with pytest.raises(RuntimeError, match=r"teacher_logits on"):
        torch.ops.opd_fast.opd_forward(S.cuda(), T, None, None, 4, "student_topk", "pg", 1.0)


# ---------------------------------------------------------------------------------------------
# opd_fast.opd_loss: value checks (NaN, +inf, all -inf rows, sampled_ids range)
# ---------------------------------------------------------------------------------------------


def _poison(tensor, row, col, value):
    tensor = tensor.clone()
    tensor.view(-1, tensor.shape[-1])[row, col] = value
    return tensor


VALUE_ERRORS = [
    (
        "nan_student",
        "student",
        float("nan"),
        r"student_logits: 1 valid row\(s\) with NaN or \+inf "
        r"\(first: flattened row 2\)",
    ),
    (
        "nan_teacher",
        "teacher",
        float("nan"),
        r"teacher_logits: 1 valid row\(s\) with NaN or \+inf "
        r"\(first: flattened row 2\)",
    ),
    ("posinf_student", "student", float("inf"), r"student_logits: .* NaN or \+inf"),
    ("posinf_teacher", "teacher", float("inf"), r"teacher_logits: .* NaN or \+inf"),
]


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str
)
@pytest.mark.parametrize(
    "which, value, pattern", [pytest.param(*c[1:], id=c[0]) for c in VALUE_ERRORS]
)
def test_non_finite_values(which, value, pattern, dtype):
    student, teacher = S.to(dtype), T.to(dtype)
    if which == "student":
        student = _poison(student, 2, 7, value)
    else:
        teacher = _poison(teacher, 2, 7, value)
    with pytest.raises(NonFiniteLogitsError, match=pattern):
        opd_fast.opd_loss(student, teacher, k=4)
    assert issubclass(NonFiniteLogitsError, ValueError)


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_all_neg_inf_row(which):
    student, teacher = S.clone(), T.clone()
    (student if which == "student" else teacher)[1] = float("-inf")
    with pytest.raises(
        NonFiniteLogitsError,
        match=rf"{which}_logits: 1 valid row\(s\) with every entry is -inf "
        r"\(first: flattened row 1\)",
    ):
        opd_fast.opd_loss(student, teacher, k=4)


def test_all_nan_row_is_reported_as_nan_not_neg_inf():
    student = S.clone()
    student[3] = float("nan")
    with pytest.raises(NonFiniteLogitsError, match=r"NaN or \+inf \(first: flattened row 3\)"):
        opd_fast.opd_loss(student, T, k=4)


def test_non_finite_row_index_is_flattened_for_3d():
    student, teacher = logits(2, 3, VOCAB), logits(2, 3, VOCAB, seed=1)
    student[1, 2, 0] = float("nan")
    with pytest.raises(NonFiniteLogitsError, match=r"first: flattened row 5"):
        opd_fast.opd_loss(student, teacher, k=4)


@pytest.mark.parametrize("bad_id", [VOCAB, VOCAB + 100, -1, -100])
def test_sampled_ids_out_of_range(bad_id):
    sampled = ids()
    sampled[2] = bad_id
    with pytest.raises(
        ValueError,
        match=rf"sampled_ids out of range \[0, 10\): row 2 holds "
        rf"{bad_id}",
    ):
        opd_fast.opd_loss(S, T, k=4, sampled_ids=sampled)
    with pytest.raises(ValueError, match=r"sampled_ids out of range"):
        opd_fast.opd_loss(S, T, k=4, sampled_ids=sampled, variant="sampled_token")


@pytest.mark.parametrize("variant", ["student_topk", "full_vocab", "sampled_token"])
def test_masked_rows_are_not_checked(variant):
    """A masked-out row may hold anything (NaN, +inf, all -inf, an ignore-index token id): it
    is skipped, and the result equals the one without that row."""
    student, teacher = S.clone(), T.clone()
    student[1, 3] = float("nan")
    teacher[1, 5] = float("inf")
    student[2] = float("-inf")
    teacher[2] = float("nan")
    sampled = ids()
    sampled[1], sampled[2] = -100, VOCAB + 5
    mask = torch.tensor([True, False, False, True])
    leaf = student.clone().requires_grad_(True)
    out = opd_fast.opd_loss(leaf, teacher, k=4, mask=mask, sampled_ids=sampled, variant=variant)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert bool(torch.isfinite(leaf.grad).all())
    assert bool((leaf.grad[~mask] == 0).all())
    assert all(bool(torch.isfinite(value)) for value in out.metrics.values())

    kept = opd_fast.opd_loss(S[mask], T[mask], k=4, sampled_ids=sampled[mask], variant=variant)
    torch.testing.assert_close(out.loss, kept.loss)
    for name, value in kept.metrics.items():
        torch.testing.assert_close(out.metrics[name], value, msg=name)


@pytest.mark.parametrize("variant", ["student_topk", "full_vocab"])
def test_check_values_false_skips_the_checks(variant):
    """check_values=False trades the host sync for no checks: no exception; the poisoned row
    shows NaN in its entropy (so in the logged mean), and the other rows are untouched.
    (The poisoned row's loss and gradient are not specified: garbage in, garbage out.)"""
    student = _poison(S, 0, 0, float("nan")).requires_grad_(True)
    out = opd_fast.opd_loss(
        student,
        T,
        k=4,
        variant=variant,
        check_values=False,
        reduction="none",
        return_token_metrics=True,
    )
    (grad,) = torch.autograd.grad(out.loss[1:].sum(), student)
    assert torch.isnan(out.token_metrics["entropy_student"][0])
    assert torch.isnan(out.metrics["entropy_student"])
    clean_student = S.clone().requires_grad_(True)
    clean = opd_fast.opd_loss(clean_student, T, k=4, variant=variant, reduction="none")
    (clean_grad,) = torch.autograd.grad(clean.loss[1:].sum(), clean_student)
    torch.testing.assert_close(out.loss[1:], clean.loss[1:], rtol=0, atol=0)
    torch.testing.assert_close(grad[1:], clean_grad[1:], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# torch.ops.opd_fast.* called directly: RuntimeError, never a crash
# ---------------------------------------------------------------------------------------------


def _forward(
    student=S,
    teacher=T,
    sampled_ids=None,
    row_valid=None,
    k=4,
    variant="student_topk",
    estimator="pg",
    temperature=1.0,
):
    return torch.ops.opd_fast.opd_forward(
        student, teacher, sampled_ids, row_valid, k, variant, estimator, temperature
    )


OP_ERRORS = [
    (
        "1d_logits",
        dict(student=logits(VOCAB), teacher=logits(VOCAB)),
        r"student_logits must be \(N, V\)",
    ),
    (
        "3d_logits",
        dict(student=logits(2, 2, VOCAB), teacher=logits(2, 2, VOCAB)),
        r"student_logits must be \(N, V\)",
    ),
    (
        "shape_mismatch",
        dict(teacher=logits(5, VOCAB)),
        r"teacher_logits shape \[5, 10\] != "
        r"student_logits shape \[4, 10\]",
    ),
    (
        "int_logits",
        dict(student=S.long(), teacher=T.long()),
        r"student_logits must be float32, float64, bfloat16 or float16, got Long",
    ),
    (
        "mixed_dtypes",
        dict(teacher=T.double()),
        r"teacher_logits dtype Double != student_logits "
        r"dtype Float",
    ),
    ("k_zero", dict(k=0), r"k must be in \[1, min\(V, 128\)\], got k=0 with V=10"),
    ("k_above_vocab", dict(k=11), r"k must be in \[1, min\(V, 128\)\], got k=11 with V=10"),
    (
        "k_above_max",
        dict(student=logits(2, 300), teacher=logits(2, 300), k=129),
        r"got k=129 with V=300",
    ),
    ("temperature_zero", dict(temperature=0.0), r"temperature must be positive and finite"),
    (
        "temperature_nan",
        dict(temperature=float("nan")),
        r"temperature must be positive and "
        r"finite",
    ),
    (
        "temperature_inf",
        dict(temperature=float("inf")),
        r"temperature must be positive and "
        r"finite",
    ),
    ("unknown_variant", dict(variant="bogus"), r"unknown variant 'bogus'"),
    (
        "unknown_estimator",
        dict(estimator="bogus"),
        r"unknown estimator 'bogus'; expected pg, exact or "
        r"tail",
    ),
    (
        "exact_sampled_token",
        dict(variant="sampled_token", estimator="exact", sampled_ids=ids()),
        r"estimator 'exact' has no form for variant 'sampled_token'",
    ),
    (
        "sampled_token_without_ids",
        dict(variant="sampled_token"),
        r"variant 'sampled_token' needs sampled_ids",
    ),
    ("sampled_ids_int32", dict(sampled_ids=ids().int()), r"sampled_ids must be int64, got Int"),
    (
        "sampled_ids_shape",
        dict(sampled_ids=ids(ROWS + 1)),
        r"sampled_ids must be \(N,\) = "
        r"\(4,\), got \[5\]",
    ),
    ("sampled_ids_2d", dict(sampled_ids=ids(ROWS, 1)), r"sampled_ids must be \(N,\)"),
    ("row_valid_float", dict(row_valid=torch.ones(ROWS)), r"row_valid must be bool, got Float"),
    (
        "row_valid_shape",
        dict(row_valid=torch.ones(ROWS - 1, dtype=torch.bool)),
        r"row_valid must be \(N,\) = \(4,\), got \[3\]",
    ),
    (
        "meta_teacher",
        dict(teacher=T.to("meta")),
        r"teacher_logits on meta but student_logits on "
        r"cpu",
    ),
    (
        "meta_row_valid",
        dict(row_valid=torch.ones(ROWS, dtype=torch.bool, device="meta")),
        r"row_valid on meta",
    ),
]


@pytest.mark.parametrize("kwargs, pattern", [pytest.param(*c[1:], id=c[0]) for c in OP_ERRORS])
def test_op_errors(kwargs, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        _forward(**kwargs)


def test_op_meta_inputs_give_shapes_only():
    """All-meta inputs run the fake kernel: shapes and dtypes, no data, no error."""
    outputs = _forward(student=S.to("meta"), teacher=T.to("meta"), k=3)
    shapes = [(4,), (4, 10), (4,), (4,), (4,), (4, 6), (4, 6), (4,), (4,)]
    assert [tuple(o.shape) for o in outputs] == shapes
    assert all(o.device.type == "meta" for o in outputs)


@pytest.mark.parametrize("bad_id", [VOCAB, -1, 2**40])
def test_op_out_of_range_sampled_ids_do_not_read_out_of_bounds(bad_id):
    """Without opd_loss's value check an out-of-range id yields NaN for its row only, and the
    backward skips it (no out-of-bounds write)."""
    sampled = ids()
    sampled[1] = bad_id
    student = S.clone().requires_grad_(True)
    outputs = _forward(student=student, sampled_ids=sampled, variant="sampled_token")
    loss, metrics = outputs[0], outputs[1]
    assert torch.isnan(loss[1]) and bool(torch.isfinite(loss[[0, 2, 3]]).all())
    kl = metrics[:, opd_fast.TOKEN_METRIC_NAMES.index("sampled_token_kl")]
    assert torch.isnan(kl[1]) and bool(torch.isfinite(kl[[0, 2, 3]]).all())
    (grad,) = torch.autograd.grad(loss[[0, 2, 3]].sum(), student)
    assert bool(torch.isfinite(grad).all()) and bool((grad[1] == 0).all())


def _backward_inputs(variant="student_topk"):
    outputs = _forward(variant=variant, sampled_ids=ids())
    _, _, _, _, scale, sparse_id, sparse_coef, row_max, log_norm = outputs
    return [
        torch.ones(ROWS),
        S,
        T,
        row_max,
        log_norm,
        scale,
        sparse_id,
        sparse_coef,
        1.0,
        variant == "full_vocab",
        False,  # sparse_is_gradient: pg's coefficients correct the dense term
    ]


BACKWARD_ERRORS = [
    ("grad_loss_shape", 0, torch.ones(ROWS + 1), r"backward row tensors must be \(N,\)"),
    (
        "grad_loss_dtype",
        0,
        torch.ones(ROWS, dtype=torch.float64),
        r"backward row tensors must be \(N,\) Float",
    ),
    ("student_1d", 1, logits(VOCAB), r"student_logits must be \(N, V\)"),
    (
        "student_int",
        1,
        S.long(),
        r"student_logits must be float32, float64, bfloat16 or "
        r"float16",
    ),
    ("max_shape", 3, torch.zeros(ROWS - 1), r"backward row tensors must be \(N,\)"),
    ("log_norm_shape", 4, torch.zeros(ROWS - 1), r"backward row tensors must be \(N,\)"),
    (
        "sparse_id_dtype",
        6,
        torch.zeros(ROWS, 8, dtype=torch.int32),
        r"sparse_id must be \(N, W\) int64",
    ),
    (
        "sparse_id_rows",
        6,
        torch.zeros(ROWS + 1, 8, dtype=torch.int64),
        r"sparse_id must be \(N, W\) int64",
    ),
    ("sparse_coef_shape", 7, torch.zeros(ROWS, 3), r"sparse_coef must match sparse_id"),
]


@pytest.mark.parametrize(
    "index, value, pattern", [pytest.param(*c[1:], id=c[0]) for c in BACKWARD_ERRORS]
)
def test_backward_op_errors(index, value, pattern):
    args = _backward_inputs()
    args[index] = value
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.opd_fast.opd_backward(*args)


def test_backward_op_full_vocab_needs_matching_teacher():
    args = _backward_inputs("full_vocab")
    args[2] = logits(ROWS, VOCAB + 1)
    with pytest.raises(
        RuntimeError,
        match=r"full_vocab backward needs teacher_logits like "
        r"student_logits",
    ):
        torch.ops.opd_fast.opd_backward(*args)


def test_backward_op_ignores_out_of_range_sparse_ids():
    """Corrupted sparse ids are skipped rather than written out of bounds."""
    args = _backward_inputs()
    args[6] = torch.full_like(args[6], VOCAB + 7)
    args[6][:, 1] = -5
    grad = torch.ops.opd_fast.opd_backward(*args)
    assert grad.shape == S.shape and bool(torch.isfinite(grad).all())
