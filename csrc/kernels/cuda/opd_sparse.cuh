// row_topk and the sparse-teacher forward (opd_forward_sparse) on the GPU. Torch-free:
// __global__ kernels and host launchers returning cudaError_t. They reuse the streaming
// machinery of opd_forward.cuh (online softmax state, warp running top-k, bitonic merge) and
// mirror topk_rows_impl / sparse_forward_rows_impl of ../cpu/opd_sparse.inc.
//
// row_topk, per row x (V,): one CTA of kForwardThreads streams the row once, keeping an online
// softmax state per thread and a running top-k per warp; the states are reduced over the
// block, the per-warp lists merged by a bitonic sort, and the first k keys written:
//   ids (N, k) int64 sorted by (value desc, id asc), log_probs (N, k) = (value - max) / tau -
//   log_norm (shifted before scaling),
//   lse (N,), entropy (N,), all but ids in the accumulation type.
// A row whose NaNs leave fewer than k orderable entries gets the CPU's filler (the lowest
// unused ids, valued NaN; its lse is NaN anyway).
//
// opd_forward_sparse, per row: one CTA streams the student row for its lse and entropy (no
// top-k), gathers log p at the payload's student and teacher top-k ids (ids outside [0, V)
// give NaN and are never read), then thread 0 runs finish_row of ../cpu/opd_forward.inc:
// union_candidates + row_metrics + row_loss. teacher_lse is written as 0; the teacher's
// entropy and log q at the sampled token come from the payload. Rows left out by row_valid
// write zeros and sparse_id = -1. Outputs as in opd_forward.cuh (sparse width W >= 2k).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/opd_forward.cuh"
#include "kernels/row_loss.h"
#include "kernels/cuda/warp_topk.cuh"

namespace opd_fast {
namespace kernels {

template <typename scalar_t>
struct TopkParams : RowKernelParams<scalar_t> {
  using acc_t = typename Element<scalar_t>::acc_t;
  const scalar_t* logits;  // (rows, vocab), unit stride along vocab
  int64_t row_stride;      // in elements
  int64_t* ids;            // (rows, k)
  acc_t* log_probs;        // (rows, k)
  acc_t* lse;              // (rows,)
  acc_t* entropy;          // (rows,)
};

// The teacher as a payload (docs/math.md, Teacher payload), in the accumulation type.
template <typename scalar_t>
struct SparseForwardParams : ForwardRowParams<scalar_t> {
  using acc_t = typename Element<scalar_t>::acc_t;
  const int64_t* student_topk_ids;            // (rows, k)
  const int64_t* teacher_topk_ids;            // (rows, k)
  const acc_t* teacher_topk_log_probs;        // (rows, k): log q at teacher_topk_ids
  const acc_t* teacher_log_probs_at_student;  // (rows, k): log q at student_topk_ids
  const acc_t* teacher_entropy;               // (rows,)
  const acc_t* teacher_sampled_log_probs;     // (rows,), given with sampled_ids
};

// ---------------------------------------------------------------------------------------
// Streaming one row: the softmax state (always) and a warp running top-k (kTopk).
// ---------------------------------------------------------------------------------------

template <typename acc_t, int kSlots>
struct SingleStream {
  SoftmaxState<acc_t> softmax;
  WarpTopk<acc_t, kSlots> top;
};

// Consumes N elements per lane, ids first_id + i. Called by every lane of the warp when
// kTopk (lanes past the end pass valid = false).
template <bool kTopk, int N, typename acc_t, int kSlots>
__device__ __forceinline__ void consume_one(SingleStream<acc_t, kSlots>& st, const acc_t (&x)[N],
                                            int64_t first_id, bool valid, acc_t inv_tau, int k,
                                            int lane) {
  if (valid) softmax_add<false>(st.softmax, x, x, inv_tau);
  if (kTopk) st.top.offer(x, first_id, valid, k, lane);
}

// Streams row[0, vocab): scalar head, 16-byte vectors, scalar tail; block-uniform trip counts.
template <bool kTopk, typename scalar_t, typename acc_t, int kSlots>
__device__ __forceinline__ void stream_row(SingleStream<acc_t, kSlots>& st,
                                           const scalar_t* __restrict__ row, int64_t vocab,
                                           acc_t inv_tau, int k, int lane) {
  using E = Element<scalar_t>;
  constexpr int kVec = E::kVec;
  const int64_t head = vector_head(row);
  const RowSplit split = split_row<kVec>(vocab, head, head, head);
  for (int64_t base = 0; base < split.head; base += kForwardThreads) {
    const int64_t i = base + threadIdx.x;
    const bool valid = i < split.head;
    acc_t x[1] = {-INFINITY};
    if (valid) x[0] = E::to_acc(row[i]);
    consume_one<kTopk>(st, x, i, valid, inv_tau, k, lane);
  }
  for (int64_t base = 0; base < split.num_vec; base += 2 * kForwardThreads) {
    const int64_t v0 = base + threadIdx.x;
    const int64_t v1 = v0 + kForwardThreads;
    const bool valid0 = v0 < split.num_vec;
    const bool valid1 = v1 < split.num_vec;
    acc_t x0[kVec], x1[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) x0[i] = x1[i] = -INFINITY;
    if (valid0) E::load_vec(row + split.head + v0 * kVec, x0);
    if (valid1) E::load_vec(row + split.head + v1 * kVec, x1);
    consume_one<kTopk>(st, x0, split.head + v0 * kVec, valid0, inv_tau, k, lane);
    consume_one<kTopk>(st, x1, split.head + v1 * kVec, valid1, inv_tau, k, lane);
  }
  for (int64_t base = split.body_end; base < vocab; base += kForwardThreads) {
    const int64_t i = base + threadIdx.x;
    const bool valid = i < vocab;
    acc_t x[1] = {-INFINITY};
    if (valid) x[0] = E::to_acc(row[i]);
    consume_one<kTopk>(st, x, i, valid, inv_tau, k, lane);
  }
}

// Block-wide reduction of the per-thread softmax states; the result is valid in every thread.
// `scratch` holds kForwardWarps states plus one for the result. All threads must call it.
template <typename acc_t>
__device__ __forceinline__ SoftmaxState<acc_t> softmax_block_reduce(SoftmaxState<acc_t> state,
                                                                    SoftmaxState<acc_t>* scratch,
                                                                    acc_t inv_tau, int warp,
                                                                    int lane) {
  state = softmax_warp_reduce(state, inv_tau);
  if (lane == 0) scratch[warp] = state;
  __syncthreads();
  if (warp == 0) {
    SoftmaxState<acc_t> s = lane < kForwardWarps ? scratch[lane] : softmax_empty<acc_t>();
    s = softmax_warp_reduce(s, inv_tau);
    if (lane == 0) scratch[kForwardWarps] = s;
  }
  __syncthreads();
  return scratch[kForwardWarps];
}

// ---------------------------------------------------------------------------------------
// row_topk kernel. Dynamic shared memory: kForwardWarps * kpad keys.
// ---------------------------------------------------------------------------------------

template <typename scalar_t, int kSlots>
__global__ void __launch_bounds__(kForwardThreads)
    row_topk_kernel(const TopkParams<scalar_t> p, const int kpad) {
  using acc_t = typename Element<scalar_t>::acc_t;
  using Ops = TopkKey<acc_t>;

  __shared__ SoftmaxState<acc_t> topk_warp_softmax[kForwardWarps + 1];
  __shared__ int64_t topk_id[kMaxK];
  __shared__ acc_t topk_value[kMaxK];

  const auto [row, tid, lane, warp] = row_thread();
  const int k = p.k;
  const acc_t inv_tau = p.inv_tau;
  const scalar_t* __restrict__ logits = p.logits + row * p.row_stride;

  SingleStream<acc_t, kSlots> st;
  st.softmax = softmax_empty<acc_t>();
  st.top.init();
  stream_row<true>(st, logits, p.vocab, inv_tau, k, lane);

  auto* keys = dynamic_smem<typename Ops::type>();
  st.top.store(keys + warp * kpad, k, kpad, lane);
  // Its barriers also publish the per-warp key lists.
  const SoftmaxState<acc_t> s =
      softmax_block_reduce(st.softmax, topk_warp_softmax, inv_tau, warp, lane);
  block_sort_descending<acc_t>(keys, kForwardWarps * kpad, 1);

  for (int i = tid; i < k; i += kForwardThreads) {
    topk_id[i] = Ops::index(keys[i]);  // -1 for an empty key
    topk_value[i] = Ops::value(keys[i]);
  }
  __syncthreads();
  if (tid == 0) fill_if_short(topk_id, topk_value, k);
  __syncthreads();
  const acc_t log_norm = softmax_log_norm(s);
  for (int i = tid; i < k; i += kForwardThreads) {
    p.ids[row * k + i] = topk_id[i];
    p.log_probs[row * k + i] = shifted_log_prob(topk_value[i], s.max, inv_tau, log_norm);
  }
  if (tid == 0) {
    p.lse[row] = softmax_lse(s, inv_tau);
    p.entropy[row] = softmax_entropy(s);
  }
}

// ---------------------------------------------------------------------------------------
// opd_forward_sparse kernel (no dynamic shared memory).
// ---------------------------------------------------------------------------------------

template <typename scalar_t>
__global__ void __launch_bounds__(kForwardThreads)
    opd_forward_sparse_kernel(const SparseForwardParams<scalar_t> p) {
  using E = Element<scalar_t>;
  using acc_t = typename E::acc_t;

  __shared__ SoftmaxState<acc_t> sparse_warp_softmax[kForwardWarps + 1];
  __shared__ acc_t gathered_log_p[kMaxCandidates];  // [0, k) student ids, [k, 2k) teacher ids
  __shared__ CandidateBuffer<acc_t> cand;

  const auto [row, tid, lane, warp] = row_thread();
  if (!start_forward_row(p, row, tid)) return;  // block-uniform
  const int64_t vocab = p.vocab;
  const int k = p.k;
  const acc_t inv_tau = p.inv_tau;

  const scalar_t* __restrict__ student = p.student + row * p.student_row_stride;
  SingleStream<acc_t, 1> st;
  st.softmax = softmax_empty<acc_t>();
  stream_row<false>(st, student, vocab, inv_tau, k, lane);
  const SoftmaxState<acc_t> s =
      softmax_block_reduce(st.softmax, sparse_warp_softmax, inv_tau, warp, lane);
  const acc_t log_norm = softmax_log_norm(s);
  auto log_p = [&](acc_t z) { return shifted_log_prob(z, s.max, inv_tau, log_norm); };

  // Ids come from another process: out-of-range ones give NaN, never an out-of-bounds read.
  const int64_t* student_ids = p.student_topk_ids + row * k;
  const int64_t* teacher_ids = p.teacher_topk_ids + row * k;
  for (int i = tid; i < 2 * k; i += kForwardThreads) {
    const int64_t id = i < k ? student_ids[i] : teacher_ids[i - k];
    gathered_log_p[i] =
        id >= 0 && id < vocab ? log_p(E::to_acc(student[id])) : acc_t(NAN);
  }
  __syncthreads();

  __shared__ int complement_count;  // tail: the set's ids for a pass over the rest, else -1
  __shared__ int64_t complement[kMaxCandidates];
  RowStats<acc_t> stats{};  // meaningful in thread 0 only
  Candidates<acc_t> candidates{};
  if (tid == 0) {
    stats.student_lse = softmax_lse(s, inv_tau);
    stats.student_max = s.max;
    stats.student_log_norm = log_norm;
    stats.student_entropy = softmax_entropy(s);
    stats.teacher_lse = 0;  // unknown to the student side; not needed without full_vocab
    stats.teacher_entropy = p.teacher_entropy[row];
    if (p.sampled_ids != nullptr) {
      if (set_sampled_token(stats, p.sampled_ids[row], vocab)) {
        stats.sampled_log_p = log_p(E::to_acc(student[stats.sampled_id]));
      }
      stats.sampled_log_q = p.teacher_sampled_log_probs[row];
    }
    candidates =
        union_candidates(k, student_ids, gathered_log_p, p.teacher_log_probs_at_student + row * k,
                         teacher_ids, gathered_log_p + k, p.teacher_topk_log_probs + row * k, cand);
    complement_count = -1;
    if (p.estimator == Estimator::kTail && tail_wants_complement(p.variant, stats, candidates)) {
      complement_count = complement_ids(p.variant, stats, candidates, complement);
    }
  }
  __syncthreads();
  // tail: the student's rest is summed over its logits; the teacher's is 1 - its set mass.
  if (complement_count >= 0) {  // block-uniform
    SoftmaxState<acc_t> student_rest, unused;
    complement_states<scalar_t, acc_t>(student, nullptr, vocab, complement, complement_count,
                                       inv_tau, sparse_warp_softmax, tid, warp, lane,
                                       student_rest, unused);
    if (tid == 0) {
      stats.has_student_tail = true;
      stats.student_tail_log_mass = rest_log_mass(student_rest, s.max, inv_tau, log_norm);
    }
  }
  if (tid != 0) return;
  finish_forward_row(p, row, stats, candidates);
}

// ---------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------

// Runs row_topk on `stream`. Needs launchable(rows, vocab, k) (else cudaErrorInvalidValue);
// rows == 0 is a no-op.
template <typename scalar_t>
cudaError_t launch(const TopkParams<scalar_t>& p, cudaStream_t stream) {
  if (!launchable(p.rows, p.vocab, p.k)) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  using Key = typename TopkKey<typename Element<scalar_t>::acc_t>::type;
  return with_topk_slots(p.k, [&](auto slots, int kpad) {
    const size_t smem = size_t(kForwardWarps) * kpad * sizeof(Key);
    row_topk_kernel<scalar_t, decltype(slots)::value>
        <<<dim3(static_cast<unsigned>(p.rows)), kForwardThreads, smem, stream>>>(p, kpad);
    return cudaGetLastError();
  });
}

// Runs opd_forward_sparse on `stream`. Needs launchable(rows, vocab, k) and sparse_width >= 2k
// (else cudaErrorInvalidValue); rows == 0 is a no-op.
template <typename scalar_t>
cudaError_t launch(const SparseForwardParams<scalar_t>& p, cudaStream_t stream) {
  if (!launchable(p.rows, p.vocab, p.k) || p.out.sparse_width < 2 * p.k) {
    return cudaErrorInvalidValue;
  }
  if (p.rows == 0) return cudaSuccess;
  opd_forward_sparse_kernel<scalar_t>
      <<<dim3(static_cast<unsigned>(p.rows)), kForwardThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace opd_fast
