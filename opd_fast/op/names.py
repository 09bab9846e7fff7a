"""The op's names and limits, in one place: what the reference, the loss, the kernels'
wrappers, the config and the CLI accept. The compiled extension exports its own copies
(`opd_fast._C.variants`, ...) and `opd_fast.op._extension` checks at import that they agree.

The math behind each name is in docs/math.md.
"""

from __future__ import annotations

import torch

# The loss's token set A; the order is the kernels' Variant enum (csrc/kernels/names.h).
VARIANTS = (
    "student_topk",
    "teacher_topk",
    "overlap_topk",
    "nonoverlap_topk",
    "union_topk",
    "full_vocab",
    "sampled_token",
)
# The order is the kernels' Estimator enum.
ESTIMATORS = ("pg", "exact", "tail")

# Per-token metrics, in the order the kernels write them (the kernels' Metric enum).
TOKEN_METRIC_NAMES = (
    "overlap_ratio",
    "overlap_mass_student",
    "overlap_mass_teacher",
    "overlap_token_advantage",
    "entropy_student",
    "entropy_teacher",
    "entropy_gap",
    "student_topk_mass",
    "teacher_topk_mass",
    "sampled_token_kl",
)

# pg weights renormalised over the set A; nonoverlap_topk and full_vocab use raw p(v).
RENORMALISED_PG_VARIANTS = ("student_topk", "teacher_topk", "overlap_topk", "union_topk")

# A teacher payload (top-k ids and log-probs instead of logits) serves every variant but this.
NEEDS_TEACHER_LOGITS = ("full_vocab",)

# tail sums the rest of a row itself where its set holds more than 15/16 of a model's mass
# (log-mass above this; kTailComplementLogMass in csrc/kernels/row_loss.h), else takes
# log(1 - mass of the set).
TAIL_COMPLEMENT_LOG_MASS = -0.0645385211375711716  # log(15 / 16)

REDUCTIONS = ("token_mean", "seq_mean_token_sum", "sum", "none")

LOGITS_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Largest k the kernels accept (kMaxK, csrc/kernels/names.h): their candidate union holds at
# most 2 * MAX_K ids.
MAX_K = 128


def check_k(k, vocab: int | None = None, *, where: str = "") -> None:
    """Raise naming the problem unless k is an int in [1, min(vocab, MAX_K)] (vocab: the
    logits' columns, when known)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{where}k must be an int, got {type(k).__name__}")
    limit = MAX_K if vocab is None else min(vocab, MAX_K)
    if not 1 <= k <= limit:
        bound = f"min(V, {MAX_K})], got k={k} with V={vocab}" if vocab else f"{MAX_K}], got {k}"
        raise ValueError(f"{where}k must be in [1, {bound}")


def check_variant_estimator(variant: str, estimator: str, *, where: str = "") -> None:
    """Raise naming the problem unless the pair is one the op computes."""
    if variant not in VARIANTS:
        raise ValueError(f"{where}unknown variant {variant!r}; expected one of {VARIANTS}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"{where}unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
    if variant == "sampled_token" and estimator == "exact":
        raise ValueError(
            f"{where}estimator='exact' has no form for variant='sampled_token'; use 'pg'"
        )


def smallest_temperature(dtype: torch.dtype = torch.float32) -> float:
    """The smallest temperature the kernels accept for logits of `dtype`: they scale shifted
    logits by 1 / temperature in the accumulation type (float64 for float64 logits, else
    float32), and below this that inverse overflows (csrc/launchers/checks.h)."""
    return 6e-309 if dtype == torch.float64 else 3e-39


def check_temperature(temperature, dtype: torch.dtype = torch.float32, *, where: str = "") -> None:
    """A positive finite temperature whose inverse the accumulation type of `dtype` can hold."""
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ValueError(f"{where}temperature must be a positive finite number, got {temperature}")
    if temperature < smallest_temperature(dtype):
        raise ValueError(
            f"{where}temperature {temperature} is too small: 1 / temperature overflows the "
            f"{'float64' if dtype == torch.float64 else 'float32'} accumulation of {dtype} "
            f"logits (use temperature >= {smallest_temperature(dtype)})"
        )
