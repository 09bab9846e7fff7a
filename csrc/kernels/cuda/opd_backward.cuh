// Backward of the fused OPD op on the GPU: d loss / d student_logits in one pass.
// Torch-free: a __global__ kernel and a host launcher returning cudaError_t.
//
// Math (gradient convention of row_loss.h), per row with upstream gradient g:
//     grad_j = (g / tau) * ( p_j * (C + D * (z_j - u_j) / tau) - coef(j) )
//     p_j = exp(z_j / tau - lse_s)   (0 where z_j = -inf),  D = 1 only for full_vocab,
// coef(j) non-zero only at the <= W listed sparse ids; with sparse_is_gradient (the tail
// estimator) grad_j = (g / tau) * coef(j) there instead. Same as backward_rows_impl in
// ../cpu/opd_backward.inc.
//
// Shapes: student (N, V) (and teacher (N, V) for full_vocab) with unit stride along V and any
// row stride; grad_loss, student_max, student_log_norm, grad_scale (N,) and sparse_coef (N, W) in the
// accumulation type; sparse_id (N, W) int64 (entries < 0 or >= V are skipped);
// grad_student (N, V) contiguous, logits dtype.
//
// Parallel scheme: one CTA per row. The CTA streams the row once with 16-byte loads and
// stores (scalar at an unaligned head and at the tail; a row whose pointers disagree on
// 16-byte alignment is done all scalar) writing the dense part, rounded once to the logits
// dtype; rows with g == 0 just write zeros. After __syncthreads() the listed sparse ids are
// overwritten with the recomputed dense value minus (g / tau) * coef (again one rounding), or
// with (g / tau) * coef where the coefficients are the gradient itself.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/common.cuh"
#include "kernels/row_loss.h"

namespace opd_fast {
namespace kernels {

constexpr int kBackwardThreads = 256;

template <typename scalar_t>
struct BackwardParams {
  using acc_t = typename Element<scalar_t>::acc_t;
  const scalar_t* student;  // (rows, vocab), unit stride along vocab
  const scalar_t* teacher;  // only read when full_vocab
  int64_t student_row_stride;
  int64_t teacher_row_stride;
  int64_t rows;
  int64_t vocab;
  acc_t inv_tau;  // acc_t(1) / acc_t(temperature), computed on the host
  bool full_vocab;
  bool sparse_is_gradient;  // sparse_coef is those entries' gradient (tail), not a correction
  const acc_t* grad_loss;    // (rows,)
  const acc_t* student_max;       // (rows,) raw max of z, from the forward
  const acc_t* student_log_norm;  // (rows,) log sum exp((z - max) / tau), from the forward
  const acc_t* grad_scale;   // (rows,)
  const int64_t* sparse_id;  // (rows, sparse_width)
  const acc_t* sparse_coef;  // (rows, sparse_width)
  int sparse_width;
  scalar_t* grad_student;  // (rows, vocab) contiguous
};

// The dense part before the step: p * C, or p * (z - u + C) / tau for full_vocab (row_loss.h);
// 0 where p is 0 (or NaN, as on the CPU). p from the shifted form (row_loss.h).
template <bool kFullVocab, typename acc_t>
__device__ __forceinline__ acc_t dense_term(acc_t z, acc_t u, acc_t inv_tau, acc_t max,
                                            acc_t log_norm, acc_t grad_scale) {
  // One per element and written once: the fast exp (docs/math.md, Device arithmetic).
  const acc_t prob = exp_stream(shifted_log_prob(z, max, inv_tau, log_norm));
  acc_t factor = grad_scale;
  if (kFullVocab) factor = prob > acc_t(0) ? (z - u + grad_scale) * inv_tau : acc_t(0);
  return prob > acc_t(0) ? prob * factor : acc_t(0);
}

template <typename scalar_t, bool kFullVocab>
__global__ void __launch_bounds__(kBackwardThreads)
    opd_backward_kernel(const BackwardParams<scalar_t> p) {
  using E = Element<scalar_t>;
  using acc_t = typename E::acc_t;
  constexpr int kVec = E::kVec;

  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t vocab = p.vocab;
  const scalar_t* __restrict__ student = p.student + row * p.student_row_stride;
  const scalar_t* __restrict__ teacher =
      kFullVocab ? p.teacher + row * p.teacher_row_stride : nullptr;
  scalar_t* __restrict__ grad = p.grad_student + row * vocab;
  const acc_t inv_tau = p.inv_tau;
  const acc_t max = p.student_max[row];
  const acc_t log_norm = p.student_log_norm[row];
  const acc_t grad_scale = p.grad_scale[row];
  const acc_t step = p.grad_loss[row] * inv_tau;
  const bool zero_row = step == acc_t(0);  // block-uniform

  const int64_t student_head = vector_head(student);
  const int64_t grad_head = vector_head(grad);
  const int64_t teacher_head = kFullVocab ? vector_head(teacher) : student_head;
  const RowSplit split = split_row<kVec>(vocab, student_head, grad_head, teacher_head);

  // Scalar part: [0, head) and [body_end, vocab).
  for (int pass = 0; pass < 2; ++pass) {
    const int64_t begin = pass == 0 ? 0 : split.body_end;
    const int64_t end = pass == 0 ? split.head : vocab;
    for (int64_t i = begin + tid; i < end; i += kBackwardThreads) {
      acc_t value = 0;
      if (!zero_row) {
        const acc_t u = kFullVocab ? E::to_acc(teacher[i]) : acc_t(0);
        value = step * dense_term<kFullVocab>(E::to_acc(student[i]), u, inv_tau, max, log_norm,
                                              grad_scale);
      }
      grad[i] = E::from_acc(value);
    }
  }
  // Vector part: two 16-byte vectors per thread per iteration, loads before stores.
  for (int64_t base = 0; base < split.num_vec; base += 2 * kBackwardThreads) {
    const int64_t v[2] = {base + tid, base + tid + kBackwardThreads};
    acc_t z[2][kVec], u[2][kVec], out[2][kVec];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) z[h][i] = u[h][i] = out[h][i] = 0;
      if (!zero_row && v[h] < split.num_vec) {
        E::load_vec(student + split.head + v[h] * kVec, z[h]);
        if (kFullVocab) E::load_vec(teacher + split.head + v[h] * kVec, u[h]);
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (v[h] >= split.num_vec) continue;
      if (!zero_row) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          out[h][i] =
              step * dense_term<kFullVocab>(z[h][i], u[h][i], inv_tau, max, log_norm, grad_scale);
        }
      }
      E::store_vec(grad + split.head + v[h] * kVec, out[h]);
    }
  }
  if (zero_row) return;

  // The sparse entries: recompute the dense value and subtract step * coef, one rounding.
  __syncthreads();  // the dense writes of every thread of this row come first
  const int64_t* sparse_id = p.sparse_id + row * p.sparse_width;
  const acc_t* sparse_coef = p.sparse_coef + row * p.sparse_width;
  for (int i = tid; i < p.sparse_width; i += kBackwardThreads) {
    const int64_t id = sparse_id[i];
    if (id < 0 || id >= vocab) continue;
    if (p.sparse_is_gradient) {
      grad[id] = E::from_acc(step * sparse_coef[i]);
      continue;
    }
    const acc_t u = kFullVocab ? E::to_acc(teacher[id]) : acc_t(0);
    // p * C - coef before the step: where p rounds to 1 they cancel exactly (tiny tau).
    const acc_t dense =
        dense_term<kFullVocab>(E::to_acc(student[id]), u, inv_tau, max, log_norm, grad_scale);
    grad[id] = E::from_acc(step * (dense - sparse_coef[i]));
  }
}

// ---------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------

// Runs the backward on `stream`. Needs rows <= 2^31 - 1 (else cudaErrorInvalidValue);
// rows == 0 or vocab == 0 is a no-op.
template <typename scalar_t>
cudaError_t launch(const BackwardParams<scalar_t>& p, cudaStream_t stream) {
  if (p.rows < 0 || p.rows > int64_t(0x7fffffff) || p.vocab < 0 || p.sparse_width < 0) {
    return cudaErrorInvalidValue;
  }
  if (p.rows == 0 || p.vocab == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(p.rows));
  if (p.full_vocab) {
    opd_backward_kernel<scalar_t, true><<<grid, dim3(kBackwardThreads), 0, stream>>>(p);
  } else {
    opd_backward_kernel<scalar_t, false><<<grid, dim3(kBackwardThreads), 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace opd_fast
