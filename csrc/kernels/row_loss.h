// Per-row OPD loss, gradient coefficients and metrics from a row's top-k candidates.
//
// Torch-free and shared by the CPU and CUDA kernels (and later the sparse-teacher form): once
// a streaming pass has produced both models' log-partition functions, entropies and top-k
// sets, everything in docs/math.md (token sets, estimators, metrics) needs only the union of
// the two top-k sets with log p and log q at each of its ids. This file does that O(k) work.
//
// Gradient convention (consumed by the backward kernels), for a row with upstream grad g:
//     dL/dz_j = (g / tau) * ( p_j * C - coef(j) )                    all but full_vocab
//     dL/dz_j = (g / tau) * p_j * (z_j - u_j + C) / tau               full_vocab
// where coef(j) is non-zero only for the listed sparse ids and p_j = exp((z_j - max) / tau -
// log_norm) from the row's raw max and log_norm. For full_vocab C = -E_p[z - u] is kept in raw
// logit units, so that z_j - u_j + C is a plain sum: where p is one-hot it cancels to exactly
// 0 (a fused multiply-add of (z - u) / tau + C would leave the rounding of (z - u) / tau,
// times 1 / tau, at a tiny tau).
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/names.h"

#if defined(__CUDACC__)
#define OPD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define OPD_HOST_DEVICE inline
#endif

namespace opd_fast {

// log softmax(x / tau) at a value x of a row whose raw max is `max` and whose log_norm is
// log sum_j exp((x_j - max) / tau): shifted by the max BEFORE scaling, as the reference does, so
// that large |x / tau| (huge logits, tiny tau) loses nothing to rounding (docs/math.md,
// Conventions, Precision). Needs a finite inv_tau; x = -inf gives -inf.
template <typename acc_t>
OPD_HOST_DEVICE acc_t shifted_log_prob(acc_t x, acc_t max, acc_t inv_tau, acc_t log_norm) {
  return (x - max) * inv_tau - log_norm;
}

// KL(p || q) over the vocabulary from a streaming pass: mean_gap = E_p[z - u] (raw logits),
// both rows' raw maxima and their shifted sums S = sum_j exp((x_j - max) / tau), as
//     KL = E_p[(z - u)/tau] - (lse_p - lse_q)
//        = (E_p[z - u] - (max_p - max_q)) / tau - log(S_p / S_q).
// Every term is of the size of the KL's own parts, not of the log-partitions (20-30), and the
// sums enter through one log of their ratio, so an fp32 KL of 1e-6 keeps its digits. A KL is
// never negative: rounding below 0 is clamped (NaN stays NaN).
template <typename acc_t>
OPD_HOST_DEVICE acc_t full_vocab_kl(acc_t mean_gap, acc_t student_max, acc_t student_sum,
                                    acc_t teacher_max, acc_t teacher_sum, acc_t inv_tau) {
  const acc_t kl = (mean_gap - (student_max - teacher_max)) * inv_tau -
                   log(student_sum / teacher_sum);
  return kl < acc_t(0) ? acc_t(0) : kl;
}

// What a streaming pass knows about one row, all in the tempered space (logits / tau).
template <typename acc_t>
struct RowStats {
  acc_t student_lse;       // log sum_j exp(z_j / tau)
  acc_t teacher_lse;       // log sum_j exp(u_j / tau)
  acc_t student_max;       // max_j z_j (raw, not divided by tau)
  acc_t student_log_norm;  // log sum_j exp((z_j - student_max) / tau)
  acc_t student_entropy;   // H(p)
  acc_t teacher_entropy;   // H(q)
  acc_t full_kl;           // KL(p || q) over the vocabulary; only filled for full_vocab
  acc_t full_mean_gap;     // E_p[z - u] in raw logits; only filled for full_vocab
  bool has_sampled;       // sampled_ids given
  acc_t sampled_log_p;    // log p(y_t)
  acc_t sampled_log_q;    // log q(y_t)
  int64_t sampled_id;     // y_t
  // tail only: log of each model's mass outside the loss set, summed over the complement by a
  // second pass (has_*_tail); without it row_loss takes log(1 - mass of the set) (log1m_exp).
  bool has_student_tail;
  bool has_teacher_tail;
  acc_t student_tail_log_mass;
  acc_t teacher_tail_log_mass;
};

// Records the sampled token y_t of a row of `vocab` ids. An id out of range becomes -1 with NaN
// log p and log q (the row's sampled_token loss is NaN, never an out-of-bounds read). Returns
// whether y_t is in range, i.e. whether the caller may read the logits at it.
template <typename acc_t>
OPD_HOST_DEVICE bool set_sampled_token(RowStats<acc_t>& stats, int64_t sampled, int64_t vocab) {
  const bool in_range = sampled >= 0 && sampled < vocab;
  stats.has_sampled = true;
  stats.sampled_id = in_range ? sampled : int64_t(-1);
  stats.sampled_log_p = acc_t(NAN);
  stats.sampled_log_q = acc_t(NAN);
  return in_range;
}

// The union of both top-k sets, each id once.
template <typename acc_t>
struct Candidates {
  int count;
  const int64_t* id;
  const acc_t* log_p;
  const acc_t* log_q;
  const bool* in_student;  // in S_p
  const bool* in_teacher;  // in S_q
};

// Room for the candidates of one row (a kernel's local or shared memory).
template <typename acc_t>
struct CandidateBuffer {
  int64_t id[kMaxCandidates];
  acc_t log_p[kMaxCandidates];
  acc_t log_q[kMaxCandidates];
  bool in_student[kMaxCandidates];
  bool in_teacher[kMaxCandidates];

  OPD_HOST_DEVICE Candidates<acc_t> first(int count) const {
    return {count, id, log_p, log_q, in_student, in_teacher};
  }
};

// Fills `out` with the union of the student's top-k ids (with log p and log q at each) and the
// teacher's (likewise), each id once, and returns it.
template <typename acc_t>
OPD_HOST_DEVICE Candidates<acc_t> union_candidates(int k, const int64_t* student_ids,
                                                   const acc_t* student_log_p,
                                                   const acc_t* student_log_q,
                                                   const int64_t* teacher_ids,
                                                   const acc_t* teacher_log_p,
                                                   const acc_t* teacher_log_q,
                                                   CandidateBuffer<acc_t>& out) {
  for (int i = 0; i < k; ++i) {
    out.id[i] = student_ids[i];
    out.log_p[i] = student_log_p[i];
    out.log_q[i] = student_log_q[i];
    out.in_student[i] = true;
    out.in_teacher[i] = false;
  }
  int count = k;
  for (int i = 0; i < k; ++i) {
    int match = -1;
    for (int j = 0; j < k; ++j) {
      if (out.id[j] == teacher_ids[i]) {
        match = j;
        break;
      }
    }
    if (match >= 0) {
      out.in_teacher[match] = true;
      continue;
    }
    out.id[count] = teacher_ids[i];
    out.log_p[count] = teacher_log_p[i];
    out.log_q[count] = teacher_log_q[i];
    out.in_student[count] = false;
    out.in_teacher[count] = true;
    ++count;
  }
  return out.first(count);
}

// What the row contributes to the loss and to the backward pass.
template <typename acc_t>
struct RowResult {
  acc_t loss;
  acc_t grad_scale;  // C
  int sparse_count;  // entries written to sparse_id / sparse_coef
};

template <typename acc_t>
OPD_HOST_DEVICE acc_t safe_exp(acc_t x) {
  return x == -INFINITY ? acc_t(0) : exp(x);
}

// w * (log_q - log_p), with 0 where w is 0 so that 0 * inf never becomes NaN.
template <typename acc_t>
OPD_HOST_DEVICE acc_t weighted_log_ratio(acc_t weight, acc_t log_q, acc_t log_p) {
  return weight > acc_t(0) ? weight * (log_q - log_p) : acc_t(0);
}

OPD_HOST_DEVICE bool in_loss_set(Variant variant, bool in_student, bool in_teacher) {
  switch (variant) {
    case Variant::kStudentTopk: return in_student;
    case Variant::kTeacherTopk: return in_teacher;
    case Variant::kOverlapTopk: return in_student && in_teacher;
    case Variant::kNonoverlapTopk: return in_student != in_teacher;
    case Variant::kUnionTopk: return true;
    default: return false;
  }
}

// log sum_{i in set} exp(log_values[i]) over the candidates in `set`'s loss set, shifted by
// the set's max so that it cannot underflow: a mass summed in probability space is 0 in fp32
// once every log-probability in the set is below about -104 (a confident model), which made
// renormalised quantities -inf. -inf for an empty set (or one with zero mass).
template <typename acc_t>
OPD_HOST_DEVICE acc_t log_set_mass(Variant set, const Candidates<acc_t>& cand,
                                   const acc_t* log_values) {
  acc_t max_value = -INFINITY;
  for (int i = 0; i < cand.count; ++i) {
    if (in_loss_set(set, cand.in_student[i], cand.in_teacher[i]) && log_values[i] > max_value) {
      max_value = log_values[i];
    }
  }
  if (max_value == -INFINITY) return max_value;
  acc_t sum = 0;
  for (int i = 0; i < cand.count; ++i) {
    if (in_loss_set(set, cand.in_student[i], cand.in_teacher[i])) {
      sum += safe_exp(log_values[i] - max_value);
    }
  }
  return max_value + log(sum);
}

// log(1 - exp(x)) for a log-mass x <= 0 (Maechler's log1mexp: expm1 above -ln 2, log1p below).
// A mass that rounded to >= 1 leaves nothing (-inf); NaN stays NaN.
template <typename acc_t>
OPD_HOST_DEVICE acc_t log1m_exp(acc_t x) {
  if (x != x) return x;
  if (x >= acc_t(0)) return acc_t(-INFINITY);
  return x > acc_t(-0.693147180559945309) ? log(-expm1(x)) : log1p(-exp(x));
}

// The tail estimator's set A as candidates: the variant's loss set, or for sampled_token the
// one token y_t (`one` holds it).
template <typename acc_t>
struct TailSet {
  Variant filter;
  Candidates<acc_t> cand;
};

template <typename acc_t>
struct OneCandidate {
  int64_t id;
  acc_t log_p, log_q;
  bool member;
};

template <typename acc_t>
OPD_HOST_DEVICE TailSet<acc_t> tail_set(Variant variant, const RowStats<acc_t>& stats,
                                        const Candidates<acc_t>& cand, OneCandidate<acc_t>& one) {
  if (variant != Variant::kSampledToken) return {variant, cand};
  one = {stats.sampled_id, stats.sampled_log_p, stats.sampled_log_q, true};
  return {Variant::kUnionTopk, {1, &one.id, &one.log_p, &one.log_q, &one.member, &one.member}};
}

// log(15/16): above this log-mass of A, 1 - mass keeps fewer than all but 4 bits of the rest's
// digits, and tail sums the rest of the row instead. Below it, 1 - mass is the better choice:
// it is made of the same rounded log-probs as the terms of A, so their rounding cancels to
// first order in the loss (a rest summed on its own would not cancel it).
constexpr double kTailComplementLogMass = -0.0645385211375711716;

// Whether 1 - (mass of A) loses digits for either model (A holds more than 15/16 of it), so
// that a caller with the logits should sum the complement itself (complement_ids, has_*_tail).
template <typename acc_t>
OPD_HOST_DEVICE bool tail_wants_complement(Variant variant, const RowStats<acc_t>& stats,
                                           const Candidates<acc_t>& cand) {
  if (variant == Variant::kFullVocab) return false;
  OneCandidate<acc_t> one;
  const TailSet<acc_t> set = tail_set(variant, stats, cand, one);
  const acc_t threshold = acc_t(kTailComplementLogMass);
  return log_set_mass(set.filter, set.cand, set.cand.log_p) > threshold ||
         log_set_mass(set.filter, set.cand, set.cand.log_q) > threshold;
}

// The ids of A ascending (room for kMaxCandidates), for a pass over the complement; returns the
// count. Ids out of [0, V) (a payload's, or y_t = -1) are harmless: the pass skips ids it meets.
template <typename acc_t>
OPD_HOST_DEVICE int complement_ids(Variant variant, const RowStats<acc_t>& stats,
                                   const Candidates<acc_t>& cand, int64_t* ids) {
  OneCandidate<acc_t> one;
  const TailSet<acc_t> set = tail_set(variant, stats, cand, one);
  int count = 0;
  for (int i = 0; i < set.cand.count; ++i) {
    if (!in_loss_set(set.filter, set.cand.in_student[i], set.cand.in_teacher[i])) continue;
    const int64_t id = set.cand.id[i];
    int at = count++;
    for (; at > 0 && ids[at - 1] > id; --at) ids[at] = ids[at - 1];
    ids[at] = id;
  }
  return count;
}

// tail (docs/math.md, Estimators: tail): the reverse KL of the |A|+1 categories "each v in A"
// and "the rest", with the full-vocabulary p and q (not renormalised):
//     L = sum_A p_v (log p_v - log q_v) + P (log P - log Q),  P = 1 - sum_A p, Q = 1 - sum_A q,
//     dL/dz_j = (1/tau) p_j (a_j - L) for j in A, (1/tau) p_j (a - L) elsewhere,
// with a_j = log p_j - log q_j and a = log P - log Q (0 where P = 0: no mass to move).
// The rest's C = a - L is formed as sum_A p_j (a - a_j) (equal, as 1 - P = sum_A p): a - L
// cancels to a few ulp of a when A holds little of the student's mass and the teacher's rest
// is tiny (a of ~15, a - L of ~0.3), the sum keeps its digits. The entries of A carry their
// whole gradient p_j (a_j - L) (the backward's sparse_is_gradient): p_j C - p_j (a - a_j) would
// lose the digits of a dominant p_j (1 - p_j times a large C). For the one entry with
// p_j > 1/2, a_j - L is summed as sum_{i in A, i != j} p_i (a_j - a_i) + P (a_j - a), every
// term a small weight times a difference, so a_j - L keeps its digits as p_j -> 1.
template <typename acc_t>
OPD_HOST_DEVICE RowResult<acc_t> tail_row_loss(Variant variant, const RowStats<acc_t>& stats,
                                               const Candidates<acc_t>& all, int64_t* sparse_id,
                                               acc_t* sparse_coef) {
  if (variant == Variant::kSampledToken && stats.sampled_id < 0) {
    return {acc_t(NAN), acc_t(NAN), 0};  // y_t out of range: NaN like pg, no gradient list
  }
  OneCandidate<acc_t> one;
  const TailSet<acc_t> set = tail_set(variant, stats, all, one);
  const Candidates<acc_t>& cand = set.cand;
  const acc_t log_tail_p = stats.has_student_tail
                               ? stats.student_tail_log_mass
                               : log1m_exp(log_set_mass(set.filter, cand, cand.log_p));
  const acc_t log_tail_q = stats.has_teacher_tail
                               ? stats.teacher_tail_log_mass
                               : log1m_exp(log_set_mass(set.filter, cand, cand.log_q));
  const acc_t tail_p = safe_exp(log_tail_p);
  const acc_t tail_gap = tail_p > acc_t(0) ? log_tail_p - log_tail_q : acc_t(0);
  acc_t loss = tail_p > acc_t(0) ? tail_p * tail_gap : acc_t(0);
  for (int i = 0; i < cand.count; ++i) {
    if (!in_loss_set(set.filter, cand.in_student[i], cand.in_teacher[i])) continue;
    loss += weighted_log_ratio(safe_exp(cand.log_p[i]), cand.log_p[i], cand.log_q[i]);
  }
  RowResult<acc_t> result{loss, acc_t(0), 0};
  for (int i = 0; i < cand.count; ++i) {
    if (!in_loss_set(set.filter, cand.in_student[i], cand.in_teacher[i])) continue;
    const acc_t p = safe_exp(cand.log_p[i]);
    if (!(p > acc_t(0))) continue;
    const acc_t gap = cand.log_p[i] - cand.log_q[i];
    result.grad_scale += p * (tail_gap - gap);
    acc_t gap_minus_loss = gap - loss;
    if (p > acc_t(0.5)) {  // the dominant entry: a_j - L from small weights (comment above)
      gap_minus_loss = tail_p > acc_t(0) ? tail_p * (gap - tail_gap) : acc_t(0);
      for (int other = 0; other < cand.count; ++other) {
        if (other == i || !in_loss_set(set.filter, cand.in_student[other], cand.in_teacher[other])) {
          continue;
        }
        const acc_t weight = safe_exp(cand.log_p[other]);
        if (weight > acc_t(0)) gap_minus_loss += weight * (gap - (cand.log_p[other] - cand.log_q[other]));
      }
      if (!(loss - loss == acc_t(0))) gap_minus_loss = gap - loss;  // NaN / inf propagate
    }
    sparse_id[result.sparse_count] = cand.id[i];
    sparse_coef[result.sparse_count] = p * gap_minus_loss;
    ++result.sparse_count;
  }
  if (!(loss - loss == acc_t(0))) result.grad_scale = tail_gap - loss;  // NaN / inf: as before
  return result;
}

// Fills metrics[kNumMetrics] for one row (docs/math.md, Metrics).
template <typename acc_t>
OPD_HOST_DEVICE void row_metrics(const RowStats<acc_t>& stats, const Candidates<acc_t>& cand,
                                 int k, acc_t* metrics) {
  int overlap_count = 0;
  acc_t overlap_mass_p = 0, overlap_mass_q = 0, student_mass = 0, teacher_mass = 0;
  for (int i = 0; i < cand.count; ++i) {
    const acc_t p = safe_exp(cand.log_p[i]);
    const acc_t q = safe_exp(cand.log_q[i]);
    if (cand.in_student[i]) student_mass += p;
    if (cand.in_teacher[i]) teacher_mass += q;
    if (cand.in_student[i] && cand.in_teacher[i]) {
      ++overlap_count;
      overlap_mass_p += p;
      overlap_mass_q += q;
    }
  }
  // Mean over O of ptil * (log qtil - log ptil), with ptil, qtil renormalised over O.
  acc_t overlap_advantage = NAN;
  if (overlap_count > 0) {
    const acc_t log_zp = log_set_mass(Variant::kOverlapTopk, cand, cand.log_p);
    const acc_t log_zq = log_set_mass(Variant::kOverlapTopk, cand, cand.log_q);
    acc_t total = 0;
    for (int i = 0; i < cand.count; ++i) {
      if (!(cand.in_student[i] && cand.in_teacher[i])) continue;
      const acc_t log_p_til = cand.log_p[i] - log_zp;
      const acc_t p_til = log_zp > acc_t(-INFINITY) ? safe_exp(log_p_til) : acc_t(0);
      total += weighted_log_ratio(p_til, cand.log_q[i] - log_zq, log_p_til);
    }
    overlap_advantage = total / acc_t(overlap_count);
  }
  metrics[kOverlapRatio] = acc_t(overlap_count) / acc_t(k);
  metrics[kOverlapMassStudent] = overlap_mass_p;
  metrics[kOverlapMassTeacher] = overlap_mass_q;
  metrics[kOverlapTokenAdvantage] = overlap_advantage;
  metrics[kEntropyStudent] = stats.student_entropy;
  metrics[kEntropyTeacher] = stats.teacher_entropy;
  metrics[kEntropyGap] = fabs(stats.teacher_entropy - stats.student_entropy);
  metrics[kStudentTopkMass] = student_mass;
  metrics[kTeacherTopkMass] = teacher_mass;
  metrics[kSampledTokenKl] =
      stats.has_sampled ? stats.sampled_log_p - stats.sampled_log_q : acc_t(0);
}

// Loss value, C and the sparse gradient coefficients of one row (docs/math.md, Estimators).
// sparse_id / sparse_coef need room for cand.count entries (1 for sampled_token).
template <typename acc_t>
OPD_HOST_DEVICE RowResult<acc_t> row_loss(Variant variant, Estimator estimator,
                                          const RowStats<acc_t>& stats,
                                          const Candidates<acc_t>& cand, int64_t* sparse_id,
                                          acc_t* sparse_coef) {
  RowResult<acc_t> result{acc_t(0), acc_t(0), 0};
  if (variant == Variant::kFullVocab) {
    // Every estimator is the true reverse KL (tail: A = V leaves an empty rest): grad = p_j (log p_j - log q_j - KL) / tau
    // = p_j (z_j - u_j - E_p[z - u]) / tau^2: C = -E_p[z - u] needs no log-partition at all.
    result.loss = stats.full_kl;
    result.grad_scale = -stats.full_mean_gap;
    return result;
  }
  if (estimator == Estimator::kTail) {
    return tail_row_loss(variant, stats, cand, sparse_id, sparse_coef);
  }
  if (variant == Variant::kSampledToken) {
    const acc_t advantage = stats.sampled_log_q - stats.sampled_log_p;
    result.loss = -advantage;
    result.grad_scale = advantage;
    sparse_id[0] = stats.sampled_id;
    sparse_coef[0] = advantage;
    result.sparse_count = 1;
    return result;
  }
  // Log set masses (for renormalisation), in log space so that they cannot underflow.
  const acc_t log_zp = log_set_mass(variant, cand, cand.log_p);
  const acc_t log_zq = log_set_mass(variant, cand, cand.log_q);
  if (estimator == Estimator::kPg) {
    const bool renormalise = variant != Variant::kNonoverlapTopk;
    acc_t advantage_sum = 0;
    for (int i = 0; i < cand.count; ++i) {
      if (!in_loss_set(variant, cand.in_student[i], cand.in_teacher[i])) continue;
      const acc_t p = safe_exp(cand.log_p[i]);
      acc_t weight = p;
      if (renormalise) {
        weight = log_zp > acc_t(-INFINITY) ? safe_exp(cand.log_p[i] - log_zp) : acc_t(0);
      }
      const acc_t advantage = weighted_log_ratio(weight, cand.log_q[i], cand.log_p[i]);
      if (advantage == acc_t(0)) continue;
      advantage_sum += advantage;
      sparse_id[result.sparse_count] = cand.id[i];
      sparse_coef[result.sparse_count] = advantage;
      ++result.sparse_count;
    }
    result.loss = -advantage_sum;
    result.grad_scale = advantage_sum;
    return result;
  }
  // exact: sum_A pbar (log pbar - log qbar), gradient pbar_j (log pbar_j - log qbar_j - L).
  if (!(log_zp > acc_t(-INFINITY))) return result;
  acc_t loss = 0;
  for (int i = 0; i < cand.count; ++i) {
    if (!in_loss_set(variant, cand.in_student[i], cand.in_teacher[i])) continue;
    const acc_t log_p_bar = cand.log_p[i] - log_zp;
    loss += weighted_log_ratio(safe_exp(log_p_bar), log_p_bar, cand.log_q[i] - log_zq);
  }
  for (int i = 0; i < cand.count; ++i) {
    if (!in_loss_set(variant, cand.in_student[i], cand.in_teacher[i])) continue;
    const acc_t log_p_bar = cand.log_p[i] - log_zp;
    const acc_t p_bar = safe_exp(log_p_bar);
    if (!(p_bar > acc_t(0))) continue;
    sparse_id[result.sparse_count] = cand.id[i];
    sparse_coef[result.sparse_count] = -p_bar * (log_p_bar - (cand.log_q[i] - log_zq) - loss);
    ++result.sparse_count;
  }
  result.loss = loss;
  return result;
}

}  // namespace opd_fast
