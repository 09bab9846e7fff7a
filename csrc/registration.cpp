// The opd_fast operator schemas; backends register in launchers/cpu.cpp and launchers/cuda.cu.
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
  // Exact top-k (ties -> lower id) with log softmax(x / tau) at those ids, the row's
  // log-partition and entropy, in one pass: a teacher's payload, a student's requested ids.
  m.def(
      "row_topk(Tensor logits, int k, float temperature) -> "
      "(Tensor ids, Tensor log_probs, Tensor lse, Tensor entropy)");
  // opd_forward with the teacher given as a payload (OPD_SPEC.md section 6) instead of
  // logits; every variant but full_vocab. Same outputs (teacher_lse is 0).
  m.def(
      "opd_forward_sparse(Tensor student_logits, Tensor student_topk_ids, "
      "Tensor teacher_topk_ids, Tensor teacher_topk_log_probs, "
      "Tensor teacher_log_probs_at_student, Tensor teacher_entropy, Tensor? sampled_ids, "
      "Tensor? teacher_sampled_log_probs, Tensor? row_valid, int k, str variant, "
      "str estimator, float temperature) -> "
      "(Tensor loss, Tensor metrics, Tensor student_lse, Tensor teacher_lse, "
      "Tensor grad_scale, Tensor sparse_id, Tensor sparse_coef)");
}
