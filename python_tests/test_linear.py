"""opd_fast.linear_opd_loss (the loss from hidden states, in token chunks) equals the
materialised path, opd_loss(hidden @ weight[:vocab].T + bias), and the pure-PyTorch reference:
loss, every metric, token metrics and the gradients w.r.t. hidden, weight and bias, for every
variant, estimator, reduction and dtype, with masks, temperature, padded and tied weights; it
passes gradcheck and opcheck, works under torch.compile, never forms an (N, V) tensor, and
refuses bad input by name."""

from __future__ import annotations

import pytest
import torch
from conftest import VARIANT_ESTIMATORS, requires_cuda
from torch.utils._python_dispatch import TorchDispatchMode

import opd_fast
from opd_fast.op import reference
from opd_fast.op.linear import (
    LinearOpInputs,
    LinearTeacher,
    default_chunk_tokens,
    linear_opd_forward,
    linear_opd_loss,
)
from opd_fast.op.loss import NonFiniteLogitsError
from opd_fast.op.payload import payload_from_logits

pytestmark = pytest.mark.usefixtures("single_thread")

HIDDEN, TEACHER_HIDDEN, VOCAB, PADDED_ROWS = 12, 9, 97, 101


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _problem(batch_shape, *, dtype=torch.float64, seed=0, bias=True):
    """Student hidden/weight/bias and a linear teacher whose logits correlate with the
    student's (so the top-k sets overlap partly), tables padded past VOCAB."""
    gen = _generator(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    hidden = randn(*batch_shape, HIDDEN)
    weight = randn(PADDED_ROWS, HIDDEN, scale=0.6)
    student_bias = randn(PADDED_ROWS, scale=0.5) if bias else None
    teacher_hidden = randn(*batch_shape, TEACHER_HIDDEN)
    teacher_weight = randn(PADDED_ROWS + 4, TEACHER_HIDDEN, scale=0.6)
    return hidden, weight, student_bias, LinearTeacher(teacher_hidden, teacher_weight)


def _teacher_logits(teacher: LinearTeacher):
    return reference.linear_logits(teacher.hidden, teacher.weight, teacher.bias, VOCAB)


def _mask_and_ids(batch_shape, seed=3):
    gen = _generator(seed)
    mask = torch.rand(batch_shape, generator=gen) < 0.75
    ids = torch.randint(0, VOCAB, batch_shape, generator=gen)
    return mask, ids


def _fused(hidden, weight, bias, teacher, grad_output=None, **kwargs):
    """linear_opd_loss forward + backward on fresh leaves: (output, (d hidden, d W, d bias))."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight)]
    if bias is not None:
        leaves.append(bias.detach().clone().requires_grad_(True))
    out = linear_opd_loss(
        leaves[0],
        leaves[1],
        teacher,
        student_bias=None if bias is None else leaves[2],
        return_token_metrics=True,
        **kwargs,
    )
    upstream = torch.ones_like(out.loss) if grad_output is None else grad_output
    return out, torch.autograd.grad(out.loss, leaves, upstream)


def _materialised(hidden, weight, bias, teacher_logits, grad_output=None, vocab=VOCAB, **kwargs):
    """opd_loss on the logits formed whole, with autograd through the matmul."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight)]
    if bias is not None:
        leaves.append(bias.detach().clone().requires_grad_(True))
    logits = reference.linear_logits(
        leaves[0], leaves[1], leaves[2] if bias is not None else None, vocab
    )
    out = opd_fast.opd_loss(logits, teacher_logits, return_token_metrics=True, **kwargs)
    upstream = torch.ones_like(out.loss) if grad_output is None else grad_output
    return out, torch.autograd.grad(out.loss, leaves, upstream)


def _assert_same(fused, materialised, *, atol, rtol, token_atol=None):
    """token_atol: the per-token metrics' absolute tolerance (default atol)."""
    (out, grads), (expected, expected_grads) = fused, materialised
    token_atol = atol if token_atol is None else token_atol
    torch.testing.assert_close(out.loss, expected.loss, atol=atol, rtol=rtol)
    assert out.metrics.keys() == expected.metrics.keys()
    for name in expected.metrics:
        torch.testing.assert_close(
            out.metrics[name], expected.metrics[name], atol=atol, rtol=rtol, equal_nan=True,
            msg=lambda m, name=name: f"metric {name}: {m}",
        )  # fmt: skip
    assert out.token_metrics.keys() == expected.token_metrics.keys()
    for name in expected.token_metrics:
        torch.testing.assert_close(
            out.token_metrics[name], expected.token_metrics[name], atol=token_atol, rtol=rtol,
            equal_nan=True, msg=lambda m, name=name: f"token metric {name}: {m}",
        )  # fmt: skip
    for name, grad, expected_grad in zip(("hidden", "weight", "bias"), grads, expected_grads):
        assert grad.dtype == expected_grad.dtype
        torch.testing.assert_close(
            grad, expected_grad, atol=atol, rtol=rtol, msg=lambda m, name=name: f"d {name}: {m}"
        )


@pytest.mark.parametrize("variant,estimator", VARIANT_ESTIMATORS)
@pytest.mark.parametrize("teacher_form", ["linear", "logits", "payload"])
def test_every_variant_matches_materialised_and_reference(variant, estimator, teacher_form):
    """fp64, (B, T, H) input, mask, sampled ids, temperature, 5 chunks with a remainder."""
    if teacher_form == "payload" and variant == "full_vocab":
        pytest.skip("a payload cannot score full_vocab")
    batch_shape = (3, 13)
    hidden, weight, bias, linear_teacher = _problem(batch_shape)
    teacher_logits = _teacher_logits(linear_teacher)
    mask, ids = _mask_and_ids(batch_shape)
    settings = dict(k=7, variant=variant, estimator=estimator, temperature=0.7, mask=mask,
                    sampled_ids=ids)  # fmt: skip
    teacher = {
        "linear": linear_teacher,
        "logits": teacher_logits,
        "payload": None,
    }[teacher_form]
    if teacher_form == "payload":
        student_logits = reference.linear_logits(hidden, weight, bias, VOCAB).reshape(-1, VOCAB)
        requested = opd_fast.op.kernels.row_topk(student_logits, 7, 0.7).ids
        teacher = payload_from_logits(
            teacher_logits.reshape(-1, VOCAB), requested, 7, 0.7, ids.reshape(-1)
        ).map(lambda t: t.reshape(*batch_shape, *t.shape[1:]))
    fused = _fused(hidden, weight, bias, teacher, vocab=VOCAB, chunk_tokens=8, **settings)
    materialised_teacher = teacher_logits if teacher_form == "linear" else teacher
    materialised = _materialised(hidden, weight, bias, materialised_teacher, **settings)
    _assert_same(fused, materialised, atol=1e-11, rtol=1e-9)

    # The pure-PyTorch reference, on the materialised logits.
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss, _, _ = reference.linear_opd_loss(
        leaves[0], leaves[1], teacher_logits, student_bias=leaves[2], vocab=VOCAB, **settings
    )
    expected_grads = torch.autograd.grad(loss, leaves)
    torch.testing.assert_close(fused[0].loss, loss.detach(), atol=1e-10, rtol=1e-9)
    for grad, expected in zip(fused[1], expected_grads):
        torch.testing.assert_close(grad, expected, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean_token_sum", "sum", "none"])
@pytest.mark.parametrize("chunk_tokens", [1, 5, 64])
def test_reductions_and_chunk_sizes(reduction, chunk_tokens):
    """Per-sequence and per-token reductions across chunk boundaries (a non-unit upstream
    gradient, so the backward's scaling is tested, and for 'none' its second pass)."""
    batch_shape = (4, 11)
    hidden, weight, bias, teacher = _problem(batch_shape, seed=5)
    mask, ids = _mask_and_ids(batch_shape, seed=6)
    mask[1] = False  # a sequence with no valid token
    gen = _generator(7)
    upstream = (
        torch.randn(batch_shape, generator=gen, dtype=torch.float64)
        if reduction == "none"
        else torch.tensor(1.7, dtype=torch.float64)
    )
    settings = dict(k=5, mask=mask, sampled_ids=ids, reduction=reduction)
    fused = _fused(hidden, weight, bias, teacher, upstream, vocab=VOCAB, chunk_tokens=chunk_tokens,
                   **settings)  # fmt: skip
    materialised = _materialised(hidden, weight, bias, _teacher_logits(teacher), upstream,
                                 **settings)  # fmt: skip
    _assert_same(fused, materialised, atol=1e-11, rtol=1e-9)


DTYPE_TOLERANCES = {
    torch.float32: dict(atol=2e-5, rtol=2e-4),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=5e-3),
}


@pytest.mark.parametrize("dtype", list(DTYPE_TOLERANCES), ids=str)
@pytest.mark.parametrize("variant,estimator", [("student_topk", "pg"), ("full_vocab", "exact"),
                                               ("union_topk", "exact")])  # fmt: skip
def test_low_precision_matches_materialised(dtype, variant, estimator):
    """fp32/bf16/fp16 with fp32_weight_grad: the chunked GEMMs give the materialised path's
    values (the weight gradient summed over chunks in fp32, one rounding like the single
    GEMM's)."""
    batch_shape = (61,)
    hidden, weight, bias, teacher = _problem(batch_shape, dtype=dtype, seed=9)
    mask, ids = _mask_and_ids(batch_shape, seed=10)
    settings = dict(k=16, variant=variant, estimator=estimator, mask=mask, sampled_ids=ids,
                    temperature=1.3)  # fmt: skip
    fused = _fused(hidden, weight, bias, teacher, vocab=VOCAB, chunk_tokens=16,
                   fp32_weight_grad=True, **settings)  # fmt: skip
    materialised = _materialised(hidden, weight, bias, _teacher_logits(teacher), **settings)
    _assert_same(fused, materialised, **DTYPE_TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_weight_gradient_summed_in_place(dtype):
    """By default a low-precision weight gradient is summed over the chunks in its own dtype:
    within a few roundings of that dtype per chunk of the fp64 gradient, and no further than
    the fp32 sum is from it by more than those roundings. fp32 weights are unaffected."""
    batch_shape = (61,)
    hidden, weight, bias, teacher = _problem(batch_shape, dtype=dtype, seed=9)
    mask, ids = _mask_and_ids(batch_shape, seed=10)
    settings = dict(k=16, mask=mask, sampled_ids=ids, vocab=VOCAB, chunk_tokens=16)
    _, (_, in_place, _) = _fused(hidden, weight, bias, teacher, **settings)
    _, (_, in_fp32, _) = _fused(hidden, weight, bias, teacher, fp32_weight_grad=True, **settings)
    exact = _fused(
        hidden.double(), weight.double(), bias.double(),
        LinearTeacher(teacher.hidden.double(), teacher.weight.double()), **settings,
    )[1][1]  # fmt: skip
    assert in_place.dtype == dtype
    chunks = -(-61 // 16)
    bound = 2 * chunks * torch.finfo(dtype).eps * exact.abs().max()
    assert (in_place.double() - exact).abs().max() <= bound + (in_fp32.double() - exact).abs().max()
    h32, w32, b32, t32 = _problem(batch_shape, dtype=torch.float32, seed=9)
    a = _fused(h32, w32, b32, t32, **settings)[1][1]
    b = _fused(h32, w32, b32, t32, fp32_weight_grad=True, **settings)[1][1]
    assert torch.equal(a, b)


def test_one_chunk_is_bitwise_the_materialised_path():
    """With every token in one chunk the fused path runs the same GEMMs and kernels as the
    materialised one: the results are identical, not merely close (the trainer's two loss
    paths then train the same model)."""
    hidden, weight, bias, teacher = _problem((2, 17), dtype=torch.float32, seed=11)
    mask, ids = _mask_and_ids((2, 17), seed=12)
    settings = dict(k=8, mask=mask, sampled_ids=ids, reduction="sum")
    (out, grads) = _fused(hidden, weight, bias, teacher, vocab=VOCAB, **settings)
    (expected, expected_grads) = _materialised(hidden, weight, bias, _teacher_logits(teacher),
                                               **settings)  # fmt: skip
    assert torch.equal(out.loss, expected.loss)
    for name in expected.metrics:
        assert torch.equal(out.metrics[name], expected.metrics[name]), name
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.equal(grad, expected_grad)


def test_tied_embeddings_and_padded_rows():
    """The lm_head weight is the input embedding (one Parameter): its gradient collects both
    uses; rows past `vocab` (padding) get a zero gradient."""
    gen = _generator(13)
    table = torch.randn(PADDED_ROWS, HIDDEN, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, VOCAB, (2, 9), generator=gen)
    teacher_logits = torch.randn(2, 9, VOCAB, generator=gen, dtype=torch.float64)

    def run(fused):
        embedding = table.clone().requires_grad_(True)
        hidden = torch.tanh(embedding[tokens])  # a stand-in for the model's body
        if fused:
            out = linear_opd_loss(hidden, embedding, teacher_logits, vocab=VOCAB, k=4,
                                  chunk_tokens=4)  # fmt: skip
        else:
            out = opd_fast.opd_loss(hidden @ embedding[:VOCAB].T, teacher_logits, k=4)
        (grad,) = torch.autograd.grad(out.loss, embedding)
        return out.loss, grad

    loss, grad = run(fused=True)
    expected_loss, expected_grad = run(fused=False)
    torch.testing.assert_close(loss, expected_loss, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=1e-10)
    assert grad[VOCAB:].abs().sum() == 0 or tokens.max() >= VOCAB


def test_no_tokens():
    """N = 0: loss 0, no metric rows, zero gradients (not uninitialised memory)."""
    hidden, weight, bias, teacher = _problem((0,), seed=27)
    teacher = LinearTeacher(teacher.hidden, teacher.weight)
    out, grads = _fused(hidden, weight, bias, teacher, vocab=VOCAB, k=4, reduction="sum")
    assert float(out.loss.detach()) == 0 and float(out.metrics["num_tokens"]) == 0
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))


def test_no_bias_and_no_grad():
    hidden, weight, _, teacher = _problem((2, 7), bias=False)
    fused = _fused(hidden, weight, None, teacher, vocab=VOCAB, chunk_tokens=3, k=4)
    materialised = _materialised(hidden, weight, None, _teacher_logits(teacher), k=4)
    _assert_same(fused, materialised, atol=1e-12, rtol=1e-10)
    with torch.no_grad():
        out = linear_opd_loss(hidden, weight, teacher, vocab=VOCAB, k=4, chunk_tokens=3)
    torch.testing.assert_close(out.loss, fused[0].loss.detach())
    assert not out.loss.requires_grad


@pytest.mark.parametrize("reduction", ["token_mean", "none"])
def test_gradcheck(reduction):
    batch_shape = (2, 5)
    hidden, weight, bias, teacher = _problem(batch_shape, seed=15)
    hidden, weight, bias = (t[..., :] for t in (hidden, weight[:40], bias[:40]))
    mask, ids = _mask_and_ids(batch_shape, seed=16)
    teacher = LinearTeacher(teacher.hidden, teacher.weight[:40])

    def loss(h, w, b):
        return linear_opd_loss(h, w, teacher, student_bias=b, vocab=37, k=5, mask=mask,
                               sampled_ids=ids % 37, reduction=reduction, chunk_tokens=3,
                               estimator="exact").loss  # fmt: skip

    inputs = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-6)


def test_opcheck():
    hidden, weight, bias, _ = _problem((19,), dtype=torch.float32, seed=17)
    mask, ids = _mask_and_ids((19,), seed=18)
    # A teacher close to the student: no row has an empty overlap, so no metric is NaN
    # (opcheck compares outputs with NaN != NaN).
    noise = torch.randn(hidden.shape, generator=_generator(19)) * 0.05
    teacher = LinearTeacher(hidden + noise, weight.clone())
    row_weight = mask.float() / mask.sum()
    for teacher_inputs, fp32_weight_grad in (
        (dict(teacher_hidden=teacher.hidden, teacher_weight=teacher.weight), False),
        (dict(teacher_logits=_teacher_logits(teacher)), True),
    ):
        no_teacher = dict(
            teacher_logits=None, teacher_hidden=None, teacher_weight=None, teacher_bias=None,
            payload=[], teacher_sampled_log_probs=None,
        )  # fmt: skip
        inputs = {**no_teacher, **teacher_inputs}
        args = LinearOpInputs(
            student_hidden=hidden.requires_grad_(True), student_weight=weight.requires_grad_(True),
            student_bias=bias, **inputs, sampled_ids=ids, row_valid=mask, row_weight=row_weight,
            vocab=VOCAB, k=6, variant="student_topk", estimator="pg", temperature=1.0,
            chunk_tokens=5, compute_grad=True, fp32_weight_grad=fp32_weight_grad,
        )  # fmt: skip
        torch.library.opcheck(torch.ops.opd_fast.linear_opd_forward.default, tuple(args))


@pytest.mark.parametrize("reduction", ["token_mean", "none"])
def test_torch_compile_fullgraph(reduction):
    hidden, weight, bias, teacher = _problem((2, 9), dtype=torch.float32, seed=19)
    mask, ids = _mask_and_ids((2, 9), seed=20)

    def loss_and_overlap(h, w, b):
        out = linear_opd_loss(h, w, teacher, student_bias=b, vocab=VOCAB, k=6, mask=mask,
                              sampled_ids=ids, reduction=reduction, chunk_tokens=5)  # fmt: skip
        return out.loss.sum(), out.metrics["overlap_ratio"]

    compiled = torch.compile(loss_and_overlap, fullgraph=True, backend="aot_eager")
    results = []
    for function in (loss_and_overlap, compiled):
        leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
        loss, overlap = function(*leaves)
        results.append((loss, overlap, torch.autograd.grad(loss * 1.5, leaves)))
    (loss, overlap, grads), (compiled_loss, compiled_overlap, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, loss)
    torch.testing.assert_close(compiled_overlap, overlap)
    for grad, compiled_grad in zip(grads, compiled_grads):
        torch.testing.assert_close(compiled_grad, grad)


class _LargestTensor(TorchDispatchMode):
    """Records the largest storage (in elements) any operation's output has, looking inside
    linear_opd_forward."""

    def __init__(self, inputs=()):
        super().__init__()
        self.largest, self.largest_op = 0, None
        self.inputs = {t.untyped_storage().data_ptr() for t in inputs}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.opd_fast.linear_opd_forward.default:
            with self:  # run the op's Python body under this mode too
                outputs = linear_opd_forward._init_fn(*args, **(kwargs or {}))
        else:
            outputs = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(outputs):
            if (
                isinstance(tensor, torch.Tensor)  # by storage: views hold nothing new
                and tensor.untyped_storage().data_ptr() not in self.inputs
            ):
                size = tensor.untyped_storage().nbytes() // tensor.element_size()
                if size > self.largest:
                    self.largest, self.largest_op = size, str(func)
        return outputs


@pytest.mark.parametrize("teacher_form", ["linear", "logits"])
def test_never_forms_the_full_logits(teacher_form):
    """Forward and backward of N = 300 tokens in chunks of 32: no tensor larger than the
    weight (its gradient) or a chunk's (32, V) logits appears, let alone (N, V)."""
    hidden, weight, bias, teacher = _problem((300,), dtype=torch.float32, seed=21)
    if teacher_form == "logits":
        teacher = _teacher_logits(teacher)  # an input: its chunks are views
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    with _LargestTensor(inputs=[teacher] if teacher_form == "logits" else []) as tracker:
        out = linear_opd_loss(leaves[0], leaves[1], teacher, student_bias=leaves[2],
                              vocab=VOCAB, k=8, chunk_tokens=32)  # fmt: skip
        out.loss.backward()
    limit = max(32 * VOCAB, weight.numel(), 300 * HIDDEN)
    assert 0 < tracker.largest <= limit < 300 * VOCAB, tracker.largest_op


def test_default_chunk_follows_the_memory_budget():
    vocab = 151_936
    assert default_chunk_tokens(vocab, torch.float32, False) == 256 * 2**20 // (vocab * 4 * 2)
    assert default_chunk_tokens(vocab, torch.bfloat16, True) == 256 * 2**20 // (vocab * 2 * 3)
    assert default_chunk_tokens(vocab, torch.float32, False, budget=1) == 1


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

H, W, B, T = _problem((4,), dtype=torch.float32)
T_LOGITS = _teacher_logits(T)

LINEAR_ERRORS = [
    ("hidden_1d", (H[0], W, T_LOGITS), {}, ValueError, r"student_hidden must be \(N, H\) or"),
    ("weight_1d", (H, W[0], T_LOGITS), {}, ValueError, r"student_weight must be \(V_rows, H\)"),
    ("hidden_size", (H[:, :5], W, T_LOGITS), {}, ValueError,
     r"hidden size mismatch: student_hidden has H=5, student_weight \(101, 12\) has H=12"),
    ("dtype", (H.double(), W, T_LOGITS), {}, TypeError,
     r"dtype mismatch: student_hidden is torch.float64, student_weight is torch.float32"),
    ("int_hidden", (H.long(), W, T_LOGITS), {}, TypeError, r"student_hidden must be float32"),
    ("vocab_too_large", (H, W, T_LOGITS), {"vocab": 102}, ValueError,
     r"vocab=102 is larger than student_weight's 101 rows"),
    ("vocab_type", (H, W, T_LOGITS), {"vocab": 9.5}, TypeError, r"vocab must be an int"),
    ("bias_shape", (H, W, T_LOGITS), {"student_bias": torch.zeros(97)}, ValueError,
     r"student_bias must be \(101,\)"),
    ("teacher_vocab", (H, W, T_LOGITS[:, :90]), {}, ValueError,
     r"vocabulary mismatch: student_logits has V=97, teacher_logits has V=90"),
    ("teacher_rows", (H, W, T_LOGITS[:3]), {}, ValueError, r"shape mismatch"),
    ("teacher_type", (H, W, "teacher"), {}, TypeError,
     r"teacher must be teacher logits \(a torch.Tensor\), a TeacherPayload or a LinearTeacher"),
    ("teacher_hidden_rows", (H, W, LinearTeacher(T.hidden[:3], T.weight)), {}, ValueError,
     r"shape mismatch: student_hidden \(4, 12\) vs teacher hidden \(3, 9\)"),
    ("teacher_weight_rows", (H, W, LinearTeacher(T.hidden, T.weight[:50])), {}, ValueError,
     r"vocab=97 is larger than teacher_weight's 50 rows"),
    ("teacher_dtype", (H, W, LinearTeacher(T.hidden.double(), T.weight.double())), {},
     TypeError, r"dtype mismatch: student_logits is torch.float32, teacher_logits is"),
    ("mask_shape", (H, W, T_LOGITS), {"mask": torch.ones(5, dtype=torch.bool)}, ValueError,
     r"mask must have the logits' leading shape \(4,\)"),
    ("chunk_tokens", (H, W, T_LOGITS), {"chunk_tokens": 0}, ValueError,
     r"chunk_tokens must be a positive int, got 0"),
    ("k", (H, W, T_LOGITS), {"k": 0}, ValueError, r"k must be in \[1, min\(V, 128\)\]"),
    ("reduction", (H, W, T_LOGITS), {"reduction": "mean"}, ValueError, r"unknown reduction"),
    ("seq_mean_2d", (H, W, T_LOGITS), {"reduction": "seq_mean_token_sum"}, ValueError,
     r"seq_mean_token_sum' needs \(B, T, V\)"),
]  # fmt: skip


@pytest.mark.parametrize(
    "args,kwargs,error,pattern",
    [case[1:] for case in LINEAR_ERRORS],
    ids=[c[0] for c in LINEAR_ERRORS],
)
def test_argument_errors(args, kwargs, error, pattern):
    kwargs = {"vocab": VOCAB, **kwargs}
    with pytest.raises(error, match=pattern):
        linear_opd_loss(*args, **kwargs)


def test_device_mismatch():
    with pytest.raises(
        ValueError, match=r"device mismatch: student_hidden on cpu, student_weight on meta"
    ):
        linear_opd_loss(H, W.to("meta"), T_LOGITS, vocab=VOCAB)


def test_non_finite_values_are_named():
    hidden = H.clone()
    hidden[2, 3] = float("nan")
    with pytest.raises(NonFiniteLogitsError, match=r"student_logits: 1 valid row\(s\) with NaN"):
        linear_opd_loss(hidden, W, T_LOGITS, vocab=VOCAB)
    teacher = LinearTeacher(T.hidden.clone(), T.weight)
    teacher.hidden[1, 0] = float("inf")
    with pytest.raises(NonFiniteLogitsError, match=r"teacher_logits: 1 valid row"):
        linear_opd_loss(H, W, teacher, vocab=VOCAB)
    with pytest.raises(ValueError, match=r"sampled_ids out of range \[0, 97\)"):
        linear_opd_loss(H, W, T_LOGITS, vocab=VOCAB, sampled_ids=torch.tensor([0, 1, 97, 2]))
    # A masked-out NaN row is skipped, like opd_loss does.
    out = linear_opd_loss(hidden, W, T_LOGITS, vocab=VOCAB, mask=torch.tensor([1, 1, 0, 1]).bool())
    assert torch.isfinite(out.loss)


def test_only_the_loss_is_differentiable():
    hidden, weight, bias, teacher = _problem((2, 5), seed=23)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    for reduction in ("token_mean", "none"):
        out = linear_opd_loss(*leaves, teacher, vocab=VOCAB, k=4, reduction=reduction,
                              return_token_metrics=True)  # fmt: skip
        assert out.loss.requires_grad
        tensors = list(out.metrics.values()) + list(out.token_metrics.values())
        assert not any(t.requires_grad for t in tensors)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("teacher_form", ["linear", "logits", "payload"])
def test_cuda_matches_materialised(dtype, teacher_form):
    """On the GPU: the CUDA kernels under the chunked pass give the materialised path's
    values and gradients (several chunks, a mask, sampled ids, a padded table). The payload
    form runs row_topk and the sparse-teacher forward on the GPU, and is held to the
    materialised path with the teacher's logits (the same loss for every variant but
    full_vocab, docs/math.md, Teacher payload)."""
    batch_shape = (3, 41)
    problem = _problem(batch_shape, dtype=dtype, seed=25)
    hidden, weight, bias = (t.cuda() for t in problem[:3])
    teacher = LinearTeacher(problem[3].hidden.cuda(), problem[3].weight.cuda())
    teacher_logits = _teacher_logits(teacher)
    mask, ids = (t.cuda() for t in _mask_and_ids(batch_shape, seed=26))
    settings = dict(k=16, mask=mask, sampled_ids=ids, temperature=0.9)
    given = {"linear": teacher, "logits": teacher_logits}.get(teacher_form)
    if teacher_form == "payload":
        student_logits = reference.linear_logits(hidden, weight, bias, VOCAB).reshape(-1, VOCAB)
        requested = opd_fast.op.kernels.row_topk(student_logits, 16, 0.9).ids
        given = payload_from_logits(
            teacher_logits.reshape(-1, VOCAB), requested, 16, 0.9, ids.reshape(-1)
        ).map(lambda t: t.reshape(*batch_shape, *t.shape[1:]))
        assert given.topk_ids.is_cuda
    fused = _fused(hidden, weight, bias, given, vocab=VOCAB, chunk_tokens=32, **settings)
    materialised = _materialised(hidden, weight, bias, teacher_logits, **settings)
    # A chunk's GEMM and the whole one may round a bf16 logit differently (another kernel or
    # summation order): a per-token log-ratio then moves by up to a bf16 ulp of |logit| / tau
    # per model (the means, loss and gradients stay within the dtype's tolerance).
    token_atol = None
    if dtype == torch.bfloat16:
        student_logits = reference.linear_logits(hidden, weight, bias, VOCAB)
        largest = max(float(teacher_logits.abs().max()), float(student_logits.abs().max()))
        token_atol = 4 * torch.finfo(dtype).eps * largest / settings["temperature"]
    _assert_same(fused, materialised, **DTYPE_TOLERANCES[dtype], token_atol=token_atol)
