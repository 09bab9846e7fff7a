// The opd_fast operator schemas; backends register in cpu/opd_cpu.cpp and cuda/opd_cuda.cu.
#include <torch/library.h>

TORCH_LIBRARY(opd_fast, m) {
  // One streaming pass over both (N, V) logits: per-row loss, metrics and what the backward
  // needs (student log-partition, C, and the <= 2k sparse gradient coefficients).
  m.def(
      "opd_forward(Tensor student_logits, Tensor teacher_logits, Tensor? sampled_ids, "
      "Tensor? row_valid, int k, str variant, str estimator, float temperature) -> "
      "(Tensor loss, Tensor metrics, Tensor student_lse, Tensor teacher_lse, "
      "Tensor grad_scale, Tensor sparse_id, Tensor sparse_coef)");
  // One pass over the student logits (and the teacher's for full_vocab): d loss / d z.
  m.def(
      "opd_backward(Tensor grad_loss, Tensor student_logits, Tensor teacher_logits, "
      "Tensor student_lse, Tensor grad_scale, Tensor sparse_id, Tensor sparse_coef, "
      "float temperature, bool full_vocab) -> Tensor");
}
