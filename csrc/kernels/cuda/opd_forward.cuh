// Forward of the fused OPD op on the GPU: one streaming pass over both (N, V) logits.
// Torch-free: a __global__ kernel and a host launcher returning cudaError_t.
//
// Math (per row; z = student logits, u = teacher logits, both (V,), tau = temperature), the
// same as the CPU kernel in ../cpu/opd_forward.inc:
//   lse_s = max_s / tau + log_norm_s,  log_norm_s = log sum_j exp((z_j - max_s) / tau)
//   (shifted by the raw max before scaling), H(p) = log_norm_s - sum_j p_j (z_j - max_s) / tau,
//   likewise for u; log p_j = (z_j - max_s) / tau - log_norm_s
//   full_vocab: KL(p || q) = full_vocab_kl(E_p[z - u], ...) of row_loss.h
//   S_p, S_q = top-k of z and of u, ranked on the raw logits (ties -> lower id)
// then row_loss.h turns the deduplicated union S_p u S_q, with log p and log q at each id,
// into the loss, the metrics, C (grad_scale) and the <= 2k sparse gradient coefficients.
//
// Shapes: student, teacher (N, V) with unit stride along V and any row stride;
// sampled_ids (N,) int64 or null; row_valid (N,) bool or null. Outputs, in the accumulation
// type (float, or double for double logits): loss (N,), metrics (N, kNumMetrics),
// student_lse (N,), teacher_lse (N,), grad_scale (N,), sparse_id (N, W) int64 (-1 unused),
// sparse_coef (N, W), W = sparse_width = 2k, student_max (N,), student_log_norm (N,).
//
// Parallel scheme: one CTA of kForwardThreads (256) threads per row.
//   1. Each thread streams its share of both rows with 16-byte loads (scalar at an
//      unaligned head and at the tail), keeping for each model an online softmax state
//      (running max m, sum e, sum e * d, and for full_vocab the student-weighted sum e * u/tau;
//      e = exp(x/tau - m), d = x/tau - m; m is rescaled once per vector, not per element),
//      while each warp keeps a running top-k of each model (warp_topk.cuh).
//   2. The softmax states are combined across the block (warp shuffles, then warp 0 over
//      the per-warp partials in shared memory); the per-warp top-k lists are written to
//      shared memory and bitonic-sorted: the first k of each are the row's S_p and S_q.
//   3. 2k threads build the candidate union (gathering the other model's logit at each id)
//      and thread 0 compacts it, then calls row_metrics / row_loss and writes the row.
//      tail, where the set holds more than 15/16 of a model's mass: first the whole block
//      sums both models over the rest of the row (ids not in the set, binary search).
//      A row whose NaNs left fewer than k orderable entries gets the CPU's filler ids.
// Invalid rows (row_valid false) write zeros and sparse_id = -1. A NaN logit makes the lse
// and the entropy NaN (through the sum); an all -inf row has lse = -inf and entropy 0.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/common.cuh"
#include "kernels/row_loss.h"
#include "kernels/cuda/warp_topk.cuh"

namespace opd_fast {
namespace kernels {

constexpr int kForwardThreads = 256;
constexpr int kForwardWarps = kForwardThreads / kWarpSize;

// Per-row outputs of both forward kernels, in the accumulation type.
template <typename acc_t>
struct ForwardOutputs {
  int sparse_width;    // columns of sparse_id / sparse_coef (>= 2k)
  acc_t* loss;         // (rows,)
  acc_t* metrics;      // (rows, kNumMetrics)
  acc_t* student_lse;  // (rows,)
  acc_t* teacher_lse;  // (rows,)
  acc_t* grad_scale;   // (rows,)
  int64_t* sparse_id;  // (rows, sparse_width)
  acc_t* sparse_coef;  // (rows, sparse_width)
  acc_t* student_max;       // (rows,) raw max of z
  acc_t* student_log_norm;  // (rows,) log sum exp((z - max) / tau)
};

// The launch-wide settings of every one-CTA-per-row kernel but the backward's.
template <typename scalar_t>
struct RowKernelParams {
  using acc_t = typename Element<scalar_t>::acc_t;
  int64_t rows;
  int64_t vocab;
  int k;
  acc_t inv_tau;  // 1 / temperature, computed on the host as acc_t(1) / acc_t(temperature)
};

// What both forward kernels (ForwardParams, SparseForwardParams) read and write besides the
// teacher.
template <typename scalar_t>
struct ForwardRowParams : RowKernelParams<scalar_t> {
  using acc_t = typename Element<scalar_t>::acc_t;
  const scalar_t* student;     // (rows, vocab), unit stride along vocab
  int64_t student_row_stride;  // in elements
  const int64_t* sampled_ids;  // (rows,) or nullptr
  const bool* row_valid;       // (rows,) or nullptr
  Variant variant;
  Estimator estimator;
  ForwardOutputs<acc_t> out;
};

template <typename scalar_t>
struct ForwardParams : ForwardRowParams<scalar_t> {
  const scalar_t* teacher;  // (rows, vocab), unit stride along vocab
  int64_t teacher_row_stride;
};

// ---------------------------------------------------------------------------------------
// Online softmax state (natural-log units)
// ---------------------------------------------------------------------------------------

// max = running max of the RAW x (-inf until a value above -inf was seen); sum = sum e;
// spread = sum e * d; cross = sum e * (x - other), with e = exp(d), d = (x - max) / tau: shifted
// before scaling so that huge logits or a tiny tau lose nothing (OnlineSoftmax of
// ../cpu/streaming.inc). A NaN input makes sum NaN. No member initialisers: it also lives in
// shared memory.
template <typename acc_t>
struct SoftmaxState {
  acc_t max;
  acc_t sum;
  acc_t spread;
  acc_t cross;
};

template <typename acc_t>
__device__ __forceinline__ SoftmaxState<acc_t> softmax_empty() {
  SoftmaxState<acc_t> state;
  state.max = -INFINITY;
  state.sum = 0;
  state.spread = 0;
  state.cross = 0;
  return state;
}

// Adds x[0, N) (and other[0, N) to the cross term when kCross): OnlineSoftmax::add_block of
// ../cpu/streaming.inc for one thread's vector.
template <bool kCross, typename acc_t, int N>
__device__ __forceinline__ void softmax_add(SoftmaxState<acc_t>& state, const acc_t (&x)[N],
                                            const acc_t (&other)[N], acc_t inv_tau) {
  acc_t raw_max = -INFINITY;
#pragma unroll
  for (int i = 0; i < N; ++i) raw_max = x[i] > raw_max ? x[i] : raw_max;  // skips NaN
  const acc_t vector_max = raw_max;
  if (vector_max == -INFINITY) {
    // All -inf or NaN: only a NaN must still poison the sum.
    acc_t poison = 0;
#pragma unroll
    for (int i = 0; i < N; ++i) poison += x[i] != x[i] ? x[i] : acc_t(0);
    state.sum += poison;
    return;
  }
  if (vector_max > state.max) {
    // Rescale what we have to the new max: sum e d with d -> d - delta.
    const bool was_empty = state.max == -INFINITY;
    const acc_t delta = (vector_max - state.max) * inv_tau;
    // Scales the whole running sum: the accurate exp (a few calls per thread and row).
    const acc_t scale = was_empty ? acc_t(0) : exp_precise(-delta);
    state.spread = scale > acc_t(0) ? (state.spread - delta * state.sum) * scale : acc_t(0);
    state.sum *= scale;  // keeps a NaN
    if (kCross) state.cross = scale > acc_t(0) ? state.cross * scale : acc_t(0);
    state.max = vector_max;
  }
  const acc_t running_max = state.max;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    acc_t d = (x[i] - running_max) * inv_tau;
    d = d < acc_t(-1e4) ? acc_t(-1e4) : d;  // -inf -> finite so that e * d is 0, not NaN
    const acc_t e = exp_stream(d);  // per element: the fast exp (docs/math.md, Device arithmetic)
    state.sum += e;
    state.spread += e * d;
    if (kCross) state.cross += e > acc_t(0) ? e * (x[i] - other[i]) : acc_t(0);
  }
}

// Merges two partial states (any order).
template <typename acc_t>
__device__ __forceinline__ SoftmaxState<acc_t> softmax_combine(SoftmaxState<acc_t> a,
                                                               SoftmaxState<acc_t> b,
                                                               acc_t inv_tau) {
  if (b.max > a.max) {
    const SoftmaxState<acc_t> t = a;
    a = b;
    b = t;
  }
  // Now a.max >= b.max (neither is ever NaN).
  if (a.max == -INFINITY) {
    a.sum += b.sum;  // 0, or NaN from a poisoned part
    a.spread = 0;
    a.cross = 0;
    return a;
  }
  if (b.max == -INFINITY) {
    a.sum += b.sum;  // b holds no weight, at most a NaN
    return a;
  }
  const acc_t delta = (a.max - b.max) * inv_tau;
  const acc_t scale = exp_precise(-delta);  // scales a whole partial state
  a.sum += b.sum * scale;
  a.spread += scale > acc_t(0) ? (b.spread - delta * b.sum) * scale : acc_t(0);
  a.cross += scale > acc_t(0) ? b.cross * scale : acc_t(0);
  return a;
}

template <typename acc_t>
__device__ __forceinline__ SoftmaxState<acc_t> softmax_warp_reduce(SoftmaxState<acc_t> state,
                                                                   acc_t inv_tau) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    SoftmaxState<acc_t> other;
    other.max = __shfl_xor_sync(kFullMask, state.max, offset);
    other.sum = __shfl_xor_sync(kFullMask, state.sum, offset);
    other.spread = __shfl_xor_sync(kFullMask, state.spread, offset);
    other.cross = __shfl_xor_sync(kFullMask, state.cross, offset);
    state = softmax_combine(state, other, inv_tau);
  }
  return state;
}

// log_norm = log(sum); lse = max / tau + log(sum); H = log(sum) - spread / sum; an all -inf
// row: log_norm = lse = -inf, H = 0. A NaN anywhere (sum is NaN) makes all three NaN, even in
// an all-NaN row whose max stays -inf.
template <typename acc_t>
__device__ __forceinline__ acc_t softmax_log_norm(const SoftmaxState<acc_t>& s) {
  if (s.sum != s.sum) return s.sum;
  return s.max == -INFINITY ? s.max : log(s.sum);
}
template <typename acc_t>
__device__ __forceinline__ acc_t softmax_lse(const SoftmaxState<acc_t>& s, acc_t inv_tau) {
  if (s.sum != s.sum) return s.sum;
  return s.max == -INFINITY ? s.max : s.max * inv_tau + log(s.sum);
}

template <typename acc_t>
__device__ __forceinline__ acc_t softmax_entropy(const SoftmaxState<acc_t>& s) {
  if (s.sum != s.sum) return s.sum;
  return s.max == -INFINITY ? acc_t(0) : log(s.sum) - s.spread / s.sum;
}

// A top-k list that NaNs kept short (its tail decoded to id -1) is filled with the lowest
// ids it does not hold, valued NaN: RunningTopk::fill_if_short of ../cpu/streaming.inc. Such a row
// has a NaN log-partition; this only keeps every id in range. One thread.
template <typename acc_t>
__device__ void fill_if_short(int64_t* ids, acc_t* values, int k) {
  if (ids[k - 1] >= 0) return;
  int count = 0;
  while (count < k && ids[count] >= 0) ++count;  // the held entries are a prefix
  for (int64_t next_id = 0; count < k; ++next_id) {
    bool used = false;
    for (int i = 0; i < count && !used; ++i) used = ids[i] == next_id;
    if (used) continue;
    ids[count] = next_id;
    values[count] = acc_t(NAN);
    ++count;
  }
}

// ---------------------------------------------------------------------------------------
// Kernel
// ---------------------------------------------------------------------------------------

// Per-thread state of the streaming pass.
template <typename acc_t, int kSlots>
struct StreamState {
  SoftmaxState<acc_t> student_softmax;
  SoftmaxState<acc_t> teacher_softmax;
  WarpTopk<acc_t, kSlots> student_top;
  WarpTopk<acc_t, kSlots> teacher_top;
};

// Consumes N elements per lane, ids first_id + i. Called by every lane of the warp (lanes
// past the end pass valid = false).
template <bool kFullVocab, int N, typename acc_t, int kSlots>
__device__ __forceinline__ void consume(StreamState<acc_t, kSlots>& st, const acc_t (&z)[N],
                                       const acc_t (&u)[N], int64_t first_id, bool valid,
                                       acc_t inv_tau, int k, int lane) {
  if (valid) {
    softmax_add<kFullVocab>(st.student_softmax, z, u, inv_tau);
    softmax_add<false>(st.teacher_softmax, u, u, inv_tau);
  }
  st.student_top.offer(z, first_id, valid, k, lane);
  st.teacher_top.offer(u, first_id, valid, k, lane);
}

// Elements [begin, end) one per thread; the trip count is the same for the whole block.
template <bool kFullVocab, typename scalar_t, typename acc_t, int kSlots>
__device__ __forceinline__ void consume_scalar_range(StreamState<acc_t, kSlots>& st,
                                                     const scalar_t* __restrict__ student,
                                                     const scalar_t* __restrict__ teacher,
                                                     int64_t begin, int64_t end, acc_t inv_tau,
                                                     int k, int lane) {
  using E = Element<scalar_t>;
  for (int64_t base = begin; base < end; base += kForwardThreads) {
    const int64_t i = base + threadIdx.x;
    const bool valid = i < end;
    acc_t z[1] = {-INFINITY};
    acc_t u[1] = {-INFINITY};
    if (valid) {
      z[0] = E::to_acc(student[i]);
      u[0] = E::to_acc(teacher[i]);
    }
    consume<kFullVocab>(st, z, u, i, valid, inv_tau, k, lane);
  }
}

// 16-byte vectors [0, num_vec) starting at element `head`, two per thread per iteration
// (all four loads issued before any use); block-uniform trip count.
template <bool kFullVocab, typename scalar_t, typename acc_t, int kSlots>
__device__ __forceinline__ void consume_vector_range(StreamState<acc_t, kSlots>& st,
                                                     const scalar_t* __restrict__ student,
                                                     const scalar_t* __restrict__ teacher,
                                                     int64_t head, int64_t num_vec,
                                                     acc_t inv_tau, int k, int lane) {
  using E = Element<scalar_t>;
  constexpr int kVec = E::kVec;
  for (int64_t base = 0; base < num_vec; base += 2 * kForwardThreads) {
    const int64_t v0 = base + threadIdx.x;
    const int64_t v1 = v0 + kForwardThreads;
    const bool valid0 = v0 < num_vec;
    const bool valid1 = v1 < num_vec;
    acc_t z0[kVec], u0[kVec], z1[kVec], u1[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) z0[i] = u0[i] = z1[i] = u1[i] = -INFINITY;
    if (valid0) {
      E::load_vec(student + head + v0 * kVec, z0);
      E::load_vec(teacher + head + v0 * kVec, u0);
    }
    if (valid1) {
      E::load_vec(student + head + v1 * kVec, z1);
      E::load_vec(teacher + head + v1 * kVec, u1);
    }
    consume<kFullVocab>(st, z0, u0, head + v0 * kVec, valid0, inv_tau, k, lane);
    consume<kFullVocab>(st, z1, u1, head + v1 * kVec, valid1, inv_tau, k, lane);
  }
}

// ---------------------------------------------------------------------------------------
// The tail estimator's pass over the complement of its set (row_loss.h, tail_wants_complement)
// ---------------------------------------------------------------------------------------

// Block-wide reduction of per-thread softmax states, valid in thread 0 only; `scratch` holds
// kForwardWarps states. All threads must call it.
template <typename acc_t>
__device__ __forceinline__ SoftmaxState<acc_t> softmax_reduce_to_first(SoftmaxState<acc_t> state,
                                                                       SoftmaxState<acc_t>* scratch,
                                                                       acc_t inv_tau, int warp,
                                                                       int lane) {
  state = softmax_warp_reduce(state, inv_tau);
  __syncthreads();  // scratch may still be read by an earlier reduction
  if (lane == 0) scratch[warp] = state;
  __syncthreads();
  SoftmaxState<acc_t> s = softmax_empty<acc_t>();
  if (warp == 0) {
    s = lane < kForwardWarps ? scratch[lane] : softmax_empty<acc_t>();
    s = softmax_warp_reduce(s, inv_tau);
  }
  return s;
}

// Whether `id` is among the ascending ids[0, count) (binary search).
__device__ __forceinline__ bool among(const int64_t* ids, int count, int64_t id) {
  int lo = 0, hi = count;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (ids[mid] < id) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo < count && ids[lo] == id;
}

// log of a reduced complement state's mass in a row with raw max `max` and log_norm: -inf for
// an empty complement, NaN for a NaN logit (kept in the sum).
template <typename acc_t>
__device__ __forceinline__ acc_t rest_log_mass(const SoftmaxState<acc_t>& rest, acc_t max,
                                               acc_t inv_tau, acc_t log_norm) {
  if (rest.sum != rest.sum) return rest.sum;
  if (rest.max == -INFINITY) return acc_t(-INFINITY);
  return (rest.max - max) * inv_tau + log(rest.sum) - log_norm;
}

// Both models' (student and, if `teacher` is not null, teacher) online softmax states over the
// row's ids not among skip[0, count), reduced to thread 0. All threads must call it.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void complement_states(const scalar_t* __restrict__ student,
                                                  const scalar_t* __restrict__ teacher,
                                                  int64_t vocab, const int64_t* skip, int count,
                                                  acc_t inv_tau, SoftmaxState<acc_t>* scratch,
                                                  int tid, int warp, int lane,
                                                  SoftmaxState<acc_t>& student_rest,
                                                  SoftmaxState<acc_t>& teacher_rest) {
  using E = Element<scalar_t>;
  SoftmaxState<acc_t> s = softmax_empty<acc_t>(), t = softmax_empty<acc_t>();
  for (int64_t j = tid; j < vocab; j += kForwardThreads) {
    if (among(skip, count, j)) continue;
    const acc_t z[1] = {E::to_acc(student[j])};
    softmax_add<false>(s, z, z, inv_tau);
    if (teacher != nullptr) {
      const acc_t u[1] = {E::to_acc(teacher[j])};
      softmax_add<false>(t, u, u, inv_tau);
    }
  }
  student_rest = softmax_reduce_to_first(s, scratch, inv_tau, warp, lane);
  teacher_rest = softmax_reduce_to_first(t, scratch, inv_tau, warp, lane);
}

// ---------------------------------------------------------------------------------------
// First and last steps of every forward kernel (ForwardParams or SparseForwardParams)
// ---------------------------------------------------------------------------------------

// The row's sparse gradient list starts empty (id -1); a row left out by row_valid gets zeros.
// Returns whether the row is computed (block-uniform). Every thread calls it.
template <typename Params>
__device__ __forceinline__ bool start_forward_row(const Params& p, int64_t row, int tid) {
  const auto& out = p.out;
  int64_t* sparse_id = out.sparse_id + row * out.sparse_width;
  auto* sparse_coef = out.sparse_coef + row * out.sparse_width;
  for (int i = tid; i < out.sparse_width; i += kForwardThreads) {
    sparse_id[i] = -1;
    sparse_coef[i] = 0;
  }
  if (p.row_valid == nullptr || p.row_valid[row]) return true;
  if (tid < kNumMetrics) out.metrics[row * kNumMetrics + tid] = 0;
  if (tid == 0) {
    out.loss[row] = 0;
    out.student_lse[row] = 0;
    out.teacher_lse[row] = 0;
    out.grad_scale[row] = 0;
    out.student_max[row] = 0;
    out.student_log_norm[row] = 0;
  }
  return false;
}

// Thread 0, once the row's statistics and union candidates are known: metrics, loss and the
// gradient coefficients (row_loss.h), and the row outputs.
template <typename Params, typename acc_t>
__device__ __forceinline__ void finish_forward_row(const Params& p, int64_t row,
                                                   const RowStats<acc_t>& stats,
                                                   const Candidates<acc_t>& cand) {
  const auto& out = p.out;
  row_metrics(stats, cand, p.k, out.metrics + row * kNumMetrics);
  const RowResult<acc_t> result =
      row_loss(p.variant, p.estimator, stats, cand, out.sparse_id + row * out.sparse_width,
               out.sparse_coef + row * out.sparse_width);
  out.loss[row] = result.loss;
  out.grad_scale[row] = result.grad_scale;
  out.student_lse[row] = stats.student_lse;
  out.teacher_lse[row] = stats.teacher_lse;
  out.student_max[row] = stats.student_max;
  out.student_log_norm[row] = stats.student_log_norm;
}

// One CTA per row; see the top of this file. Dynamic shared memory: 2 * kForwardWarps * kpad
// keys (kpad = k rounded up to a power of two, <= 32 * kSlots).
template <typename scalar_t, int kSlots, bool kFullVocab>
__global__ void __launch_bounds__(kForwardThreads)
    opd_forward_kernel(const ForwardParams<scalar_t> p, const int kpad) {
  using E = Element<scalar_t>;
  using acc_t = typename E::acc_t;
  using Ops = TopkKey<acc_t>;
  using Key = typename Ops::type;

  __shared__ SoftmaxState<acc_t> warp_softmax[2][kForwardWarps];
  __shared__ acc_t row_shift[2][2];  // [student, teacher][raw max, log_norm]
  __shared__ CandidateBuffer<acc_t> cand;
  __shared__ acc_t top_value[kMaxCandidates];
  __shared__ bool teacher_duplicate[kMaxK];

  const auto [row, tid, lane, warp] = row_thread();
  const int64_t vocab = p.vocab;
  const int k = p.k;
  const acc_t inv_tau = p.inv_tau;

  if (!start_forward_row(p, row, tid)) return;  // block-uniform

  const scalar_t* __restrict__ student = p.student + row * p.student_row_stride;
  const scalar_t* __restrict__ teacher = p.teacher + row * p.teacher_row_stride;

  // 1. Stream both rows once.
  StreamState<acc_t, kSlots> st;
  st.student_softmax = softmax_empty<acc_t>();
  st.teacher_softmax = softmax_empty<acc_t>();
  st.student_top.init();
  st.teacher_top.init();
  const int64_t student_head = vector_head(student);
  const int64_t teacher_head = vector_head(teacher);
  const RowSplit split = split_row<E::kVec>(vocab, student_head, teacher_head, student_head);
  consume_scalar_range<kFullVocab>(st, student, teacher, 0, split.head, inv_tau, k, lane);
  consume_vector_range<kFullVocab>(st, student, teacher, split.head, split.num_vec, inv_tau, k,
                                   lane);
  consume_scalar_range<kFullVocab>(st, student, teacher, split.body_end, vocab, inv_tau, k,
                                   lane);

  // 2a. Softmax states: per warp, then warp 0 over the warps (thread 0 keeps the stats).
  const SoftmaxState<acc_t> warp_student = softmax_warp_reduce(st.student_softmax, inv_tau);
  const SoftmaxState<acc_t> warp_teacher = softmax_warp_reduce(st.teacher_softmax, inv_tau);
  if (lane == 0) {
    warp_softmax[0][warp] = warp_student;
    warp_softmax[1][warp] = warp_teacher;
  }
  // 2b. Per-warp top-k lists to shared memory: [student: warps * kpad][teacher: same].
  const int sort_size = kForwardWarps * kpad;
  Key* student_keys = dynamic_smem<Key>();
  Key* teacher_keys = student_keys + sort_size;
  st.student_top.store(student_keys + warp * kpad, k, kpad, lane);
  st.teacher_top.store(teacher_keys + warp * kpad, k, kpad, lane);
  __syncthreads();

  RowStats<acc_t> stats{};  // meaningful in thread 0 only
  if (warp == 0) {
    SoftmaxState<acc_t> s = lane < kForwardWarps ? warp_softmax[0][lane] : softmax_empty<acc_t>();
    SoftmaxState<acc_t> t = lane < kForwardWarps ? warp_softmax[1][lane] : softmax_empty<acc_t>();
    s = softmax_warp_reduce(s, inv_tau);
    t = softmax_warp_reduce(t, inv_tau);
    if (lane == 0) {
      stats.student_lse = softmax_lse(s, inv_tau);
      stats.teacher_lse = softmax_lse(t, inv_tau);
      stats.student_max = s.max;
      stats.student_log_norm = softmax_log_norm(s);
      stats.student_entropy = softmax_entropy(s);
      stats.teacher_entropy = softmax_entropy(t);
      if (kFullVocab) {
        stats.full_mean_gap = s.cross / s.sum;
        stats.full_kl = full_vocab_kl(stats.full_mean_gap, s.max, s.sum, t.max, t.sum, inv_tau);
      }
      row_shift[0][0] = s.max;
      row_shift[0][1] = stats.student_log_norm;
      row_shift[1][0] = t.max;
      row_shift[1][1] = softmax_log_norm(t);
    }
  }
  // 2c. Merge the per-warp lists (the sort's barriers also publish row_shift).
  block_sort_descending<acc_t>(student_keys, sort_size, 2);

  // 3. Candidates, [0, k) the student's top-k in rank order, [k, 2k) the teacher's:
  //    decode the keys, fill short lists, then log p and log q at each id (the top-k
  //    model's value comes from its key, the other model's logit is gathered) and whether
  //    the id is in the other list (the union_candidates of row_loss.h, in parallel).
  for (int i = tid; i < 2 * k; i += kForwardThreads) {
    const Key key = i < k ? student_keys[i] : teacher_keys[i - k];
    cand.id[i] = Ops::index(key);  // -1 for an empty key
    top_value[i] = Ops::value(key);
  }
  __syncthreads();
  if (tid == 0) {
    fill_if_short(cand.id, top_value, k);
    fill_if_short(cand.id + k, top_value + k, k);
  }
  __syncthreads();
  auto log_p = [&](acc_t z) {
    return shifted_log_prob(z, row_shift[0][0], inv_tau, row_shift[0][1]);
  };
  auto log_q = [&](acc_t u) {
    return shifted_log_prob(u, row_shift[1][0], inv_tau, row_shift[1][1]);
  };
  for (int i = tid; i < 2 * k; i += kForwardThreads) {
    const bool from_student = i < k;
    const int64_t id = cand.id[i];  // in [0, vocab) now
    const int64_t* other_ids = from_student ? cand.id + k : cand.id;
    bool in_other = false;
    for (int j = 0; j < k; ++j) in_other = in_other || other_ids[j] == id;
    const acc_t own = top_value[i];
    if (from_student) {
      cand.log_p[i] = log_p(own);
      cand.log_q[i] = log_q(E::to_acc(teacher[id]));
    } else {
      cand.log_p[i] = log_p(E::to_acc(student[id]));
      cand.log_q[i] = log_q(own);
    }
    cand.in_student[i] = from_student;
    cand.in_teacher[i] = from_student ? in_other : true;
    if (!from_student) teacher_duplicate[i - k] = in_other;
  }
  __syncthreads();

  // Thread 0: drop the teacher entries already listed by the student (in place, in order).
  __shared__ int complement_count;  // tail: the set's ids for a pass over the rest, else -1
  int64_t* complement = dynamic_smem<int64_t>();  // the keys are decoded: room for 2k ids
  int count = k;
  if (tid == 0) {
    for (int j = 0; j < k; ++j) {
      if (teacher_duplicate[j]) continue;
      cand.id[count] = cand.id[k + j];
      cand.log_p[count] = cand.log_p[k + j];
      cand.log_q[count] = cand.log_q[k + j];
      cand.in_student[count] = false;
      cand.in_teacher[count] = true;
      ++count;
    }
    if (p.sampled_ids != nullptr && set_sampled_token(stats, p.sampled_ids[row], vocab)) {
      stats.sampled_log_p = log_p(E::to_acc(student[stats.sampled_id]));
      stats.sampled_log_q = log_q(E::to_acc(teacher[stats.sampled_id]));
    }
    complement_count = -1;
    if (p.estimator == Estimator::kTail &&
        tail_wants_complement(p.variant, stats, cand.first(count))) {
      complement_count = complement_ids(p.variant, stats, cand.first(count), complement);
    }
  }
  __syncthreads();
  if (complement_count >= 0) {  // block-uniform
    SoftmaxState<acc_t> student_rest, teacher_rest;
    complement_states(student, teacher, vocab, complement, complement_count, inv_tau,
                      warp_softmax[0], tid, warp, lane, student_rest, teacher_rest);
    if (tid == 0) {
      stats.has_student_tail = stats.has_teacher_tail = true;
      stats.student_tail_log_mass =
          rest_log_mass(student_rest, row_shift[0][0], inv_tau, row_shift[0][1]);
      stats.teacher_tail_log_mass =
          rest_log_mass(teacher_rest, row_shift[1][0], inv_tau, row_shift[1][1]);
    }
  }
  if (tid != 0) return;
  finish_forward_row(p, row, stats, cand.first(count));
}

// ---------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------

// What every row kernel's launcher checks: 1 <= k <= min(vocab, kMaxK), and rows (the grid)
// and vocab (the 31-bit ids of the top-k keys) below 2^31.
inline bool launchable(int64_t rows, int64_t vocab, int k) {
  return k >= 1 && k <= kMaxK && k <= vocab && vocab <= int64_t(0x7fffffff) && rows >= 0 &&
         rows <= int64_t(0x7fffffff);
}

// Runs the forward on `stream`. Needs launchable(rows, vocab, k) and sparse_width >= 2k (else
// cudaErrorInvalidValue); rows == 0 is a no-op.
template <typename scalar_t>
cudaError_t launch(const ForwardParams<scalar_t>& p, cudaStream_t stream) {
  if (!launchable(p.rows, p.vocab, p.k) || p.out.sparse_width < 2 * p.k) {
    return cudaErrorInvalidValue;
  }
  if (p.rows == 0) return cudaSuccess;
  using Key = typename TopkKey<typename Element<scalar_t>::acc_t>::type;
  return with_topk_slots(p.k, [&](auto slots, int kpad) {
    constexpr int kSlots = decltype(slots)::value;
    const size_t smem = size_t(2) * kForwardWarps * kpad * sizeof(Key);
    const dim3 grid(static_cast<unsigned>(p.rows));
    if (p.variant == Variant::kFullVocab) {
      opd_forward_kernel<scalar_t, kSlots, true><<<grid, kForwardThreads, smem, stream>>>(p, kpad);
    } else {
      opd_forward_kernel<scalar_t, kSlots, false><<<grid, kForwardThreads, smem, stream>>>(p, kpad);
    }
    return cudaGetLastError();
  });
}

}  // namespace kernels
}  // namespace opd_fast
