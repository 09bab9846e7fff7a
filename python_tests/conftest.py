"""Shared helpers for the opd_fast test suite.

Tolerances follow flash-attention's rule: the op is compared with the fp64 reference run on the
*same* input values, and its error may be at most a small multiple (ERROR_MULTIPLE) of the error
the pure-PyTorch reference makes when it runs in the input's precision, plus a fixed floor that
depends on the precision of the output (see Tolerance below). Token sets are ranked on the raw
input values, which are exact in every precision, so set-derived integers (overlap_ratio) must
match exactly in every dtype.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass

import pytest
import torch

import opd_fast
from opd_fast.op import reference
from opd_fast.op.names import ESTIMATORS, TOKEN_METRIC_NAMES, VARIANTS

# The op tests are thousands of small reference computations, for which waking an intra-op
# thread pool costs more than the work (and far more on a busy machine): the `single_thread`
# fixture, used by those modules, runs them on OPD_TEST_THREADS threads (default 1).
# test_op_vs_reference.py::test_threads_agree checks the multi-threaded kernels separately.
DEFAULT_THREADS = torch.get_num_threads()
TEST_THREADS = int(os.environ.get("OPD_TEST_THREADS", "1"))

# A training run picks its thread count from the cores other processes leave free
# (opd_fast/training/threads.py); tests that compare two runs need both on the same count.
os.environ.setdefault("OPD_FAST_THREADS", str(DEFAULT_THREADS))
# Inductor's on-disk cache does not notice a changed op schema: a cache from an earlier build
# of the extension would replay stale graphs. Each test session compiles afresh.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="opd-fast-inductor-"))


@pytest.fixture
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(previous)


CUDA_AVAILABLE = torch.cuda.is_available() and opd_fast.build_info().get("with_cuda", False)

requires_cuda = pytest.mark.skipif(
    not CUDA_AVAILABLE, reason="needs a CUDA GPU and opd_fast built with its CUDA kernels"
)

# cpu always, cuda when a GPU and the CUDA kernels are there (test_cuda.py adds the rest).
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.cuda)] if CUDA_AVAILABLE else [])

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

# Every valid (variant, estimator) pair: sampled_token has no exact form.
VARIANT_ESTIMATORS = [
    (variant, estimator)
    for variant in VARIANTS
    for estimator in ESTIMATORS
    if not (variant == "sampled_token" and estimator == "exact")
]

# The Hugging Face Qwen vocabulary size: the shape the kernels are tuned for.
LARGE_VOCAB = 151_936

# The op's error may be this many times the reference's own low-precision error (plus a floor).
ERROR_MULTIPLE = 2.0

# Ulps of the largest |logit| / tau allowed as absolute error in log space (log_space_floor).
LOG_SPACE_ULPS = 4.0


@dataclass(frozen=True)
class Tolerance:
    """Fixed floors on top of ERROR_MULTIPLE times the reference's own low-precision error.

    rows (loss, metrics; accumulated in fp32 for every input dtype but fp64), element-wise:
        |op - ref64| <= ERROR_MULTIPLE * max|ref_lowp - ref64| + rows_atol + rows_rtol * |ref64|
    grad (returned in the input dtype), relative to the largest gradient entry as
    flash-attention does, because p_j * (C + ...) cancels in single entries:
        |op - ref64| <= ERROR_MULTIPLE * max|ref_lowp - ref64| + grad_atol
                        + grad_rtol * max|ref64|
    For bf16/fp16 the gradient's rounding to the input dtype is covered by the ERROR_MULTIPLE
    term: the reference rounds its fp32 gradient to the input dtype the same way.
    check_against_reference adds log_space_floor (the fused kernels' log-partition rounding),
    scaled by how the reduction weighs each row.
    """

    rows_atol: float
    rows_rtol: float
    grad_atol: float
    grad_rtol: float


TOLERANCES = {
    # fp64 accumulates in fp64: only summation-order noise is allowed.
    torch.float64: Tolerance(1e-10, 1e-10, 1e-13, 1e-10),
    # fp32 accumulation over up to 151,936 entries with a ~2 ulp vectorised exp.
    torch.float32: Tolerance(2e-5, 2e-5, 1e-8, 1e-5),
    torch.bfloat16: Tolerance(2e-5, 2e-5, 1e-8, 1e-5),
    torch.float16: Tolerance(2e-5, 2e-5, 1e-8, 1e-5),
}


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------
# Comparison with the reference
# ---------------------------------------------------------------------------------------------


def describe_mismatches(name, actual, expected, allowed, count: int = 8) -> str:
    """The worst `count` entries by error / allowed error, as lines for a failure message."""
    actual64 = actual.detach().double().cpu().reshape(-1)
    expected64 = expected.detach().double().cpu().reshape(-1)
    allowed64 = torch.as_tensor(allowed, dtype=torch.float64).cpu()
    allowed64 = allowed64.expand(expected.shape).reshape(-1)
    error = (actual64 - expected64).abs()
    both_nan = actual64.isnan() & expected64.isnan()
    same_inf = (actual64 == expected64) & actual64.isinf()
    error = torch.where(both_nan | same_inf, torch.zeros_like(error), error)
    error = torch.where(error.isnan(), torch.full_like(error, math.inf), error)
    ratio = error / allowed64.clamp_min(1e-300)
    worst = torch.argsort(ratio, descending=True)[:count]
    shape = tuple(actual.shape)
    lines = [f"{name}: {int((ratio > 1).sum())} of {ratio.numel()} entries beyond tolerance"]
    for flat in worst.tolist():
        index = (
            tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), shape)) if shape else ()
        )
        lines.append(
            f"  at {index}: got {actual64[flat].item():.10g}, expected "
            f"{expected64[flat].item():.10g}, error {error[flat].item():.3g}, "
            f"allowed {allowed64[flat].item():.3g}"
        )
    return "\n".join(lines)


def assert_close(name, actual, expected, *, atol: float, rtol: float = 0.0):
    """Element-wise |actual - expected| <= atol + rtol |expected|; NaN matches NaN, inf matches
    the same inf. Prints the worst mismatches on failure."""
    actual64 = actual.detach().double().cpu()
    expected64 = expected.detach().double().cpu()
    assert actual64.shape == expected64.shape, (
        f"{name}: shape {tuple(actual64.shape)} != {tuple(expected64.shape)}"
    )
    allowed = atol + rtol * expected64.abs().nan_to_num(posinf=0.0, neginf=0.0)
    ok = torch.isclose(actual64, expected64, rtol=0.0, atol=0.0, equal_nan=True)
    ok |= (actual64 - expected64).abs() <= allowed
    if not bool(ok.all()):
        pytest.fail(describe_mismatches(name, actual64, expected64, allowed), pytrace=False)


def _max_abs(tensor: torch.Tensor) -> float:
    finite = tensor[torch.isfinite(tensor)]
    return float(finite.abs().max()) if finite.numel() else 0.0


def assert_close_to_reference(
    name, actual, reference_lowp, reference64, *, atol, rtol=0.0, scale_rtol=0.0
):
    """flash-attention's rule: the op may be ERROR_MULTIPLE times as far from the fp64 reference
    as the reference run in the input's precision is (worst case over the tensor), plus
    atol + rtol * |ref64| + scale_rtol * max|ref64|."""
    lowp64 = reference_lowp.detach().double().cpu()
    ref64 = reference64.detach().double().cpu()
    reference_error = _max_abs(lowp64 - ref64)
    assert_close(
        name,
        actual,
        ref64,
        atol=ERROR_MULTIPLE * reference_error + atol + scale_rtol * _max_abs(ref64),
        rtol=rtol,
    )


def reference_means(token_metrics: dict, valid: torch.Tensor) -> dict:
    """Batch means of the reference per-token metrics as opd_loss defines them: over valid
    tokens, overlap_token_advantage over valid tokens with a non-empty overlap."""
    valid = valid.cpu()
    count = valid.sum()
    means = {}
    for name, column in token_metrics.items():
        column = column.detach().cpu().double()
        if name == "overlap_token_advantage":
            defined = valid & ~column.isnan()
            means[name] = column[defined].sum() / defined.sum().clamp_min(1)
            means["overlap_empty_rows"] = (count - defined.sum()).double()
        else:
            means[name] = column[valid].sum() / count.clamp_min(1)
    means["num_tokens"] = count.double()
    return means


@dataclass
class Outcome:
    """One run of a loss implementation: loss, gradient, per-token metrics and batch means."""

    loss: torch.Tensor
    grad: torch.Tensor | None
    token_metrics: dict
    means: dict | None = None


def run_op(student, teacher, *, grad_output=None, **kwargs) -> Outcome:
    """opd_fast.opd_loss forward and backward on a fresh leaf copy of `student`."""
    student = student.detach().clone().requires_grad_(True)
    out = opd_fast.opd_loss(student, teacher, return_token_metrics=True, **kwargs)
    if grad_output is None:
        grad_output = torch.ones_like(out.loss)
    (grad,) = torch.autograd.grad(out.loss, student, grad_output.to(out.loss.device))
    return Outcome(out.loss.detach(), grad, out.token_metrics, out.metrics)


def run_reference(student, teacher, *, dtype=None, grad_output=None, **kwargs) -> Outcome:
    """opd_fast.reference on cpu, in `dtype` (default: the input's), with gradient.

    Mirrors reference.opd_loss (opd_loss_rows, then reduce_rows) so that the per-token losses
    are available too.
    """
    dtype = student.dtype if dtype is None else dtype
    student = student.detach().cpu().to(dtype).requires_grad_(True)
    teacher = teacher.detach().cpu().to(dtype)
    batch_shape = tuple(student.shape[:-1])
    vocab = student.shape[-1]
    ids = kwargs.get("sampled_ids")
    mask = kwargs.get("mask")
    loss_rows, metrics = reference.opd_loss_rows(
        student.reshape(-1, vocab),
        teacher.reshape(-1, vocab),
        k=kwargs.get("k", 16),
        variant=kwargs.get("variant", "student_topk"),
        estimator=kwargs.get("estimator", "pg"),
        temperature=kwargs.get("temperature", 1.0),
        sampled_ids=None if ids is None else ids.cpu().reshape(-1).long(),
    )
    if mask is None:
        valid = torch.ones(loss_rows.shape[0], dtype=torch.bool)
    else:
        valid = mask.cpu().reshape(-1).bool()
    loss = reference.reduce_rows(
        loss_rows, valid, kwargs.get("reduction", "token_mean"), batch_shape
    )
    if grad_output is None:
        grad_output = torch.ones_like(loss)
    (grad,) = torch.autograd.grad(loss, student, grad_output.cpu().to(loss.dtype))
    token_metrics = {name: value.reshape(batch_shape) for name, value in metrics.items()}
    token_losses = torch.where(valid, loss_rows.detach(), torch.zeros_like(loss_rows))
    token_metrics["loss"] = token_losses.reshape(batch_shape)
    return Outcome(loss.detach(), grad, token_metrics, reference_means(metrics, valid))


def log_space_floor(student, teacher, temperature) -> float:
    """Absolute error floor of log-space quantities (log p, log q, losses, entropies).

    A fused kernel keeps log sum exp(z / tau) as one number of the accumulation type, so
    log p_j = z_j / tau - lse carries an absolute rounding error of a few ulp of the logits'
    magnitude: LOG_SPACE_ULPS * eps * max|finite logit| / tau (the reference's log_softmax is
    more accurate there because it subtracts the max first). Negligible for fp64.
    """
    eps = torch.finfo(torch.float64 if student.dtype == torch.float64 else torch.float32).eps
    scale = 1.0
    for logits in (student, teacher):
        finite = logits.detach()[torch.isfinite(logits.detach())]
        if finite.numel():
            scale = max(scale, float(finite.abs().max()) / temperature)
    return LOG_SPACE_ULPS * eps * scale


def reduction_weights(valid, reduction, batch_shape, grad_output) -> tuple[float, float]:
    """How the reduction scales per-row errors: (sum_t |d loss / d L_t| for a scalar loss or
    1 for reduction='none'; max_t |d loss / d L_t| weighted by grad_output)."""
    rows = torch.zeros(valid.numel(), dtype=torch.float64, requires_grad=True)
    reduced = reference.reduce_rows(rows, valid.reshape(-1), reduction, batch_shape)
    upstream = torch.ones_like(reduced) if grad_output is None else grad_output.cpu().double()
    (weights,) = torch.autograd.grad(reduced, rows, upstream)
    loss_weight = 1.0 if reduction == "none" else float(weights.abs().sum())
    return loss_weight, float(weights.abs().max())


def check_against_reference(student, teacher, *, grad_output=None, **kwargs) -> Outcome:
    """Runs the op and the reference (in the input dtype and in fp64) and asserts that the loss,
    the gradient, every per-token metric of valid rows and every batch mean agree."""
    dtype = student.dtype
    tol = TOLERANCES[dtype]
    op = run_op(student, teacher, grad_output=grad_output, **kwargs)
    ref64 = run_reference(student, teacher, dtype=torch.float64, grad_output=grad_output, **kwargs)
    ref_lowp = (
        ref64
        if dtype == torch.float64
        else run_reference(student, teacher, grad_output=grad_output, **kwargs)
    )

    assert op.grad.dtype == dtype, f"gradient dtype {op.grad.dtype} != student dtype {dtype}"
    assert op.grad.device == student.device
    assert op.grad.shape == student.shape
    assert op.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)

    mask = kwargs.get("mask")
    batch_shape = tuple(student.shape[:-1])
    valid = (
        torch.ones(batch_shape, dtype=torch.bool) if mask is None else mask.detach().cpu().bool()
    )
    log_floor = log_space_floor(student, teacher, kwargs.get("temperature", 1.0))
    loss_weight, grad_weight = reduction_weights(
        valid, kwargs.get("reduction", "token_mean"), batch_shape, grad_output
    )

    def rows_close(name, actual, lowp, exact, weight=1.0):
        assert_close_to_reference(
            name,
            actual,
            lowp,
            exact,
            atol=tol.rows_atol + weight * log_floor,
            rtol=tol.rows_rtol,
        )

    rows_close("loss", op.loss, ref_lowp.loss, ref64.loss, weight=loss_weight)
    # dL_t/dz_j = (1/tau) (p_j C - c_j): an error in log p_j scales with |C| ~ |L_t|.
    loss_scale = 1.0 + 2.0 * _max_abs(ref64.token_metrics["loss"][valid].double())
    assert_close_to_reference(
        "grad",
        op.grad,
        ref_lowp.grad,
        ref64.grad,
        atol=tol.grad_atol + grad_weight * loss_scale * log_floor / kwargs.get("temperature", 1.0),
        scale_rtol=tol.grad_rtol,
    )
    expected_names = {"loss", *TOKEN_METRIC_NAMES}
    if kwargs.get("sampled_ids") is None:
        expected_names.discard("sampled_token_kl")
    assert set(op.token_metrics) == expected_names
    for name in sorted(expected_names):
        actual = op.token_metrics[name].cpu()
        assert actual.shape == batch_shape, f"{name}: shape {tuple(actual.shape)}"
        if name == "overlap_ratio":  # |O| / k: the count over exact sets must match exactly
            k = kwargs.get("k", 16)
            count = actual[valid].double() * k
            expected_count = (ref64.token_metrics[name][valid].double() * k).round()
            assert_close("overlap count |O|", count, expected_count, atol=1e-4)
            continue
        rows_close(
            name,
            actual[valid],
            ref_lowp.token_metrics[name][valid],
            ref64.token_metrics[name][valid],
        )

    assert set(op.means) == set(ref64.means), sorted(set(op.means) ^ set(ref64.means))
    for name, value in op.means.items():
        assert value.dim() == 0 and value.dtype == torch.float32, name
        # Means come back as fp32 scalars whatever the input dtype.
        rows_close(f"mean {name}", value, ref_lowp.means[name].float(), ref64.means[name].float())
    return op


# ---------------------------------------------------------------------------------------------
# Logits generators. All return (student, teacher) in fp64 on cpu unless dtype/device are given;
# cast with .to(dtype) so that both the op and the reference see identical values.
# ---------------------------------------------------------------------------------------------


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_logits(shape, *, seed=0, scale=2.0, dtype=torch.float32, device="cpu"):
    """Independent Gaussian student and teacher logits (typical overlap well below 1)."""
    gen = make_generator(seed)
    student = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    teacher = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    return student.to(dtype).to(device), teacher.to(dtype).to(device)


def correlated_logits(shape, *, seed=0, scale=3.0, noise=1.0, dtype=torch.float32, device="cpu"):
    """Teacher = student + noise: partly overlapping top-k sets, as in real OPD."""
    gen = make_generator(seed)
    student = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    teacher = student + noise * torch.randn(shape, generator=gen, dtype=torch.float64)
    return student.to(dtype).to(device), teacher.to(dtype).to(device)


def nearly_equal_logits(shape, *, seed=0, dtype=torch.float32, device="cpu"):
    """Teacher and student almost identical: overlap close to 1, losses close to 0."""
    return correlated_logits(shape, seed=seed, scale=3.0, noise=1e-2, dtype=dtype, device=device)


def tied_logits(shape, *, seed=0, levels=4, dtype=torch.float32, device="cpu"):
    """Small integers: most values are tied, so the sets depend on the lower-id-first rule."""
    gen = make_generator(seed)
    student = torch.randint(-levels, levels + 1, shape, generator=gen).to(torch.float64)
    teacher = torch.randint(-levels, levels + 1, shape, generator=gen).to(torch.float64)
    return student.to(dtype).to(device), teacher.to(dtype).to(device)


def with_neg_inf(
    student, teacher, *, seed=0, fraction=0.3, student_only_fraction=0.0, keep_finite=1
):
    """Masks a random `fraction` of the vocabulary with -inf in BOTH models (the same entries),
    and a further `student_only_fraction` in the student only. Each row keeps at least
    `keep_finite` finite entries (the first ones) in both."""
    gen = make_generator(seed + 1000)
    shape = student.shape
    shared = torch.rand(shape, generator=gen) < fraction
    student_only = torch.rand(shape, generator=gen) < student_only_fraction
    shared[..., :keep_finite] = False
    student_only[..., :keep_finite] = False
    shared = shared.to(student.device)
    student_only = student_only.to(student.device)
    student = student.masked_fill(shared | student_only, float("-inf"))
    teacher = teacher.masked_fill(shared, float("-inf"))
    return student, teacher


def sampled_ids_from(student, *, seed=0):
    """Realised tokens y_t drawn from softmax(student) (only finite-probability tokens)."""
    gen = make_generator(seed + 2000)
    probs = torch.softmax(student.detach().double().cpu(), dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    ids = torch.multinomial(flat, 1, generator=gen).reshape(probs.shape[:-1])
    return ids.to(student.device)


def random_mask(batch_shape, *, seed=0, fraction_valid=0.7, device="cpu"):
    """Bool mask with at least one valid token."""
    gen = make_generator(seed + 3000)
    mask = torch.rand(batch_shape, generator=gen) < fraction_valid
    mask.view(-1)[0] = True
    return mask.to(device)
