// Torch-free interface of the CPU row kernels (opd_forward.inc, opd_sparse.inc,
// opd_backward.inc), used by launchers/cpu.cpp: one argument struct per op and run_rows, which
// runs rows [row_begin, row_end) of it with the widest instruction set this CPU has.
#pragma once

#include <cstdint>

#include "kernels/row_loss.h"

namespace opd_fast::cpu {

enum class ElementType : int { kFloat32, kFloat64, kBFloat16, kFloat16 };

// 16-bit floats as raw bit patterns (layout-compatible with c10::BFloat16 / c10::Half).
struct BF16 {
  uint16_t bits;
};
struct FP16 {
  uint16_t bits;
};

// Outputs are of the accumulation type: float64 for float64 inputs, float32 otherwise.
struct ForwardOutputs {
  int sparse_width;    // columns of sparse_id / sparse_coef (2k)
  void* loss;          // (N,)
  void* metrics;       // (N, kNumMetrics)
  void* student_lse;   // (N,)
  void* teacher_lse;   // (N,) (0 in the sparse-teacher form)
  void* grad_scale;    // (N,)  C
  int64_t* sparse_id;  // (N, sparse_width), -1 = unused
  void* sparse_coef;   // (N, sparse_width)
  void* student_max;       // (N,) max_j z_j, raw
  void* student_log_norm;  // (N,) log sum_j exp((z_j - max) / tau)
};

// What both forward ops read and write besides the teacher.
struct ForwardRowArgs {
  ElementType dtype;
  const void* student;  // (N, V), unit stride along V
  int64_t student_row_stride;
  int64_t vocab;
  const int64_t* sampled_ids;  // (N,) or nullptr
  const bool* row_valid;       // (N,) or nullptr: skipped rows write zeros
  int k;
  Variant variant;
  Estimator estimator;
  double temperature;
  ForwardOutputs out;
};

struct ForwardArgs : ForwardRowArgs {
  const void* teacher;  // (N, V), unit stride along V
  int64_t teacher_row_stride;
};

// The teacher as a payload (docs/math.md, Teacher payload); arrays of the accumulation type.
struct SparseForwardArgs : ForwardRowArgs {
  const int64_t* student_topk_ids;           // (N, k): the ids the teacher was asked about
  const int64_t* teacher_topk_ids;           // (N, k)
  const void* teacher_topk_log_probs;        // (N, k)
  const void* teacher_log_probs_at_student;  // (N, k), at student_topk_ids
  const void* teacher_entropy;               // (N,)
  const void* teacher_sampled_log_probs;     // (N,), given with sampled_ids
};

struct TopkArgs {
  ElementType dtype;
  const void* logits;  // (N, V)
  int64_t row_stride;
  int64_t vocab;
  int k;
  double temperature;
  int64_t* ids;     // (N, k), by (value desc, id asc)
  void* log_probs;  // (N, k) log softmax(logits / tau) at ids
  void* lse;        // (N,)
  void* entropy;    // (N,)
};

struct BackwardArgs {
  ElementType dtype;
  const void* student;
  const void* teacher;  // only read when full_vocab
  int64_t student_row_stride;
  int64_t teacher_row_stride;
  int64_t vocab;
  double temperature;
  bool full_vocab;
  bool sparse_is_gradient;  // sparse_coef is those entries' gradient (tail), not a correction
  const void* grad_loss;    // (N,) accumulation type
  const void* student_max;       // (N,) from the forward
  const void* student_log_norm;  // (N,) from the forward
  const void* grad_scale;   // (N,)
  const int64_t* sparse_id; // (N, sparse_width)
  const void* sparse_coef;  // (N, sparse_width)
  int sparse_width;
  void* grad_student;  // (N, V) contiguous, input dtype
};

void run_rows(const ForwardArgs& args, int64_t row_begin, int64_t row_end);
void run_rows(const SparseForwardArgs& args, int64_t row_begin, int64_t row_end);
void run_rows(const TopkArgs& args, int64_t row_begin, int64_t row_end);
void run_rows(const BackwardArgs& args, int64_t row_begin, int64_t row_end);

// "avx512", "avx2" or "baseline": what run_rows runs on this CPU.
const char* instruction_set();

}  // namespace opd_fast::cpu
