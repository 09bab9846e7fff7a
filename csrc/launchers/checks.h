// Argument checks, parsing and output allocation shared by the CPU and CUDA launchers of the
// opd_fast ops. The Python wrapper checks first with friendlier messages; these keep direct
// torch.ops callers from ever reaching a kernel with shapes that would read out of bounds.
#pragma once

#include <string>
#include <tuple>

#include <ATen/ATen.h>

#include "kernels/row_loss.h"

namespace opd_fast {

inline Variant parse_variant(const std::string& name) {
  if (name == "student_topk") return Variant::kStudentTopk;
  if (name == "teacher_topk") return Variant::kTeacherTopk;
  if (name == "overlap_topk") return Variant::kOverlapTopk;
  if (name == "nonoverlap_topk") return Variant::kNonoverlapTopk;
  if (name == "union_topk") return Variant::kUnionTopk;
  if (name == "full_vocab") return Variant::kFullVocab;
  if (name == "sampled_token") return Variant::kSampledToken;
  TORCH_CHECK(false, "opd_fast: unknown variant '", name,
              "'; expected student_topk, teacher_topk, overlap_topk, nonoverlap_topk, "
              "union_topk, full_vocab or sampled_token");
}

inline Estimator parse_estimator(const std::string& name) {
  if (name == "pg") return Estimator::kPg;
  if (name == "exact") return Estimator::kExact;
  TORCH_CHECK(false, "opd_fast: unknown estimator '", name, "'; expected pg or exact");
}

inline void check_logits_dtype(const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                  dtype == at::kHalf,
              "opd_fast: ", name, " must be float32, float64, bfloat16 or float16, got ", dtype);
}

// Rows may be strided, but each row must be contiguous.
inline at::Tensor rows_contiguous(const at::Tensor& t) {
  return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous();
}

inline at::Tensor contiguous_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

// A checked forward call: the inputs as the kernels read them (rows contiguous; optional
// tensors contiguous or undefined) and the parsed settings.
struct ForwardPlan {
  at::Tensor student;
  at::Tensor teacher;
  at::Tensor sampled_ids;  // (N,) int64 or undefined
  at::Tensor row_valid;    // (N,) bool or undefined
  Variant variant;
  Estimator estimator;
  int k;
  int sparse_width;
  at::ScalarType acc_dtype;
};

// The sparse-teacher forward adds the teacher's payload (spec section 6), contiguous.
struct SparseForwardPlan : ForwardPlan {
  at::Tensor student_topk_ids, teacher_topk_ids, teacher_topk_log_probs,
      teacher_log_probs_at_student, teacher_entropy;
  at::Tensor teacher_sampled_log_probs;  // (N,) or undefined, given with sampled_ids
};

inline ForwardPlan plan_forward(const at::Tensor& student, const at::Tensor& teacher,
                                const c10::optional<at::Tensor>& sampled_ids,
                                const c10::optional<at::Tensor>& row_valid, int64_t k,
                                const std::string& variant, const std::string& estimator,
                                double temperature) {
  TORCH_CHECK(student.dim() == 2, "opd_fast: student_logits must be (N, V), got ",
              student.sizes());
  TORCH_CHECK(teacher.sizes() == student.sizes(), "opd_fast: teacher_logits shape ",
              teacher.sizes(), " != student_logits shape ", student.sizes());
  check_logits_dtype(student, "student_logits");
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(),
              "opd_fast: teacher_logits dtype ", teacher.scalar_type(),
              " != student_logits dtype ", student.scalar_type());
  TORCH_CHECK(teacher.device() == student.device(), "opd_fast: teacher_logits on ",
              teacher.device(), " but student_logits on ", student.device());
  const int64_t vocab = student.size(1);
  TORCH_CHECK(k >= 1 && k <= vocab && k <= kMaxK, "opd_fast: k must be in [1, min(V, ", kMaxK,
              ")], got k=", k, " with V=", vocab);
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature),
              "opd_fast: temperature must be positive and finite, got ", temperature);
  const Variant parsed_variant = parse_variant(variant);
  const Estimator parsed_estimator = parse_estimator(estimator);
  TORCH_CHECK(!(parsed_variant == Variant::kSampledToken && parsed_estimator == Estimator::kExact),
              "opd_fast: estimator 'exact' has no form for variant 'sampled_token'");
  TORCH_CHECK(parsed_variant != Variant::kSampledToken || sampled_ids.has_value(),
              "opd_fast: variant 'sampled_token' needs sampled_ids");
  if (sampled_ids.has_value()) {
    const auto& ids = *sampled_ids;
    TORCH_CHECK(ids.scalar_type() == at::kLong, "opd_fast: sampled_ids must be int64, got ",
                ids.scalar_type());
    TORCH_CHECK(ids.dim() == 1 && ids.size(0) == student.size(0),
                "opd_fast: sampled_ids must be (N,) = (", student.size(0), ",), got ", ids.sizes());
    TORCH_CHECK(ids.device() == student.device(), "opd_fast: sampled_ids on ", ids.device(),
                " but logits on ", student.device());
  }
  if (row_valid.has_value()) {
    const auto& valid = *row_valid;
    TORCH_CHECK(valid.scalar_type() == at::kBool, "opd_fast: row_valid must be bool, got ",
                valid.scalar_type());
    TORCH_CHECK(valid.dim() == 1 && valid.size(0) == student.size(0),
                "opd_fast: row_valid must be (N,) = (", student.size(0), ",), got ",
                valid.sizes());
    TORCH_CHECK(valid.device() == student.device(), "opd_fast: row_valid on ", valid.device(),
                " but logits on ", student.device());
  }
  const auto acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return ForwardPlan{rows_contiguous(student),
                     rows_contiguous(teacher),
                     contiguous_or_undefined(sampled_ids),
                     contiguous_or_undefined(row_valid),
                     parsed_variant,
                     parsed_estimator,
                     int(k),
                     int(2 * k),
                     acc_dtype};
}

// Checks of the sparse-teacher forward; returns the plan like plan_forward (teacher unset).
inline SparseForwardPlan plan_forward_sparse(
    const at::Tensor& student, const at::Tensor& student_topk_ids,
    const at::Tensor& teacher_topk_ids, const at::Tensor& teacher_topk_log_probs,
    const at::Tensor& teacher_log_probs_at_student, const at::Tensor& teacher_entropy,
    const c10::optional<at::Tensor>& sampled_ids,
    const c10::optional<at::Tensor>& teacher_sampled_log_probs,
    const c10::optional<at::Tensor>& row_valid, int64_t k, const std::string& variant,
    const std::string& estimator, double temperature) {
  // The dense checks cover student, k, names, sampled_ids and row_valid.
  SparseForwardPlan plan;
  static_cast<ForwardPlan&>(plan) = plan_forward(student, student, sampled_ids, row_valid, k,
                                                 variant, estimator, temperature);
  plan.teacher = at::Tensor();
  TORCH_CHECK(plan.variant != Variant::kFullVocab,
              "opd_fast: variant 'full_vocab' needs the teacher's full logits, not a payload");
  const int64_t rows = student.size(0);
  for (const auto* ids : {&student_topk_ids, &teacher_topk_ids}) {
    TORCH_CHECK(ids->dim() == 2 && ids->size(0) == rows && ids->size(1) == k &&
                    ids->scalar_type() == at::kLong && ids->device() == student.device(),
                "opd_fast: top-k id tensors must be (N, k) = (", rows, ", ", k, ") int64 on ",
                student.device(), ", got ", ids->sizes(), " ", ids->scalar_type());
  }
  for (const auto* values : {&teacher_topk_log_probs, &teacher_log_probs_at_student}) {
    TORCH_CHECK(values->sizes() == teacher_topk_ids.sizes() &&
                    values->scalar_type() == plan.acc_dtype &&
                    values->device() == student.device(),
                "opd_fast: teacher log-prob tensors must be (N, k) ", plan.acc_dtype);
  }
  TORCH_CHECK(teacher_entropy.dim() == 1 && teacher_entropy.size(0) == rows &&
                  teacher_entropy.scalar_type() == plan.acc_dtype &&
                  teacher_entropy.device() == student.device(),
              "opd_fast: teacher_entropy must be (N,) ", plan.acc_dtype);
  TORCH_CHECK(sampled_ids.has_value() == teacher_sampled_log_probs.has_value(),
              "opd_fast: sampled_ids and teacher_sampled_log_probs go together");
  if (teacher_sampled_log_probs.has_value()) {
    const auto& values = *teacher_sampled_log_probs;
    TORCH_CHECK(values.dim() == 1 && values.size(0) == rows &&
                    values.scalar_type() == plan.acc_dtype && values.device() == student.device(),
                "opd_fast: teacher_sampled_log_probs must be (N,) ", plan.acc_dtype);
  }
  plan.student_topk_ids = student_topk_ids.contiguous();
  plan.teacher_topk_ids = teacher_topk_ids.contiguous();
  plan.teacher_topk_log_probs = teacher_topk_log_probs.contiguous();
  plan.teacher_log_probs_at_student = teacher_log_probs_at_student.contiguous();
  plan.teacher_entropy = teacher_entropy.contiguous();
  plan.teacher_sampled_log_probs = contiguous_or_undefined(teacher_sampled_log_probs);
  return plan;
}

// The seven outputs of opd_forward / opd_forward_sparse, allocated for `rows` rows.
struct ForwardOutputTensors {
  at::Tensor loss, metrics, student_lse, teacher_lse, grad_scale, sparse_id, sparse_coef;

  ForwardOutputTensors(int64_t rows, const ForwardPlan& plan) {
    const auto options = plan.student.options().dtype(plan.acc_dtype);
    loss = at::empty({rows}, options);
    metrics = at::empty({rows, kNumMetrics}, options);
    student_lse = at::empty({rows}, options);
    teacher_lse = at::empty({rows}, options);
    grad_scale = at::empty({rows}, options);
    sparse_id = at::empty({rows, plan.sparse_width}, options.dtype(at::kLong));
    sparse_coef = at::empty({rows, plan.sparse_width}, options);
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
  as_tuple() const {
    return {loss, metrics, student_lse, teacher_lse, grad_scale, sparse_id, sparse_coef};
  }
};

// row_topk: checked logits (rows contiguous) and its four outputs.
struct RowTopkPlan {
  at::Tensor logits;
  int k;
  at::Tensor ids, log_probs, lse, entropy;

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> as_tuple() const {
    return {ids, log_probs, lse, entropy};
  }
};

inline RowTopkPlan plan_row_topk(const at::Tensor& logits, int64_t k, double temperature) {
  TORCH_CHECK(logits.dim() == 2, "opd_fast: logits must be (N, V), got ", logits.sizes());
  check_logits_dtype(logits, "logits");
  TORCH_CHECK(k >= 1 && k <= logits.size(1) && k <= kMaxK, "opd_fast: k must be in [1, min(V, ",
              kMaxK, ")], got k=", k, " with V=", logits.size(1));
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature),
              "opd_fast: temperature must be positive and finite, got ", temperature);
  RowTopkPlan plan;
  plan.logits = rows_contiguous(logits);
  plan.k = int(k);
  const int64_t rows = plan.logits.size(0);
  const auto acc = plan.logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto options = plan.logits.options().dtype(acc);
  plan.ids = at::empty({rows, k}, options.dtype(at::kLong));
  plan.log_probs = at::empty({rows, k}, options);
  plan.lse = at::empty({rows}, options);
  plan.entropy = at::empty({rows}, options);
  return plan;
}

// A checked backward call: the inputs as the kernels read them (teacher only with full_vocab).
struct BackwardPlan {
  at::Tensor student, teacher, grad_loss, student_lse, grad_scale, sparse_id, sparse_coef;
};

inline BackwardPlan plan_backward(const at::Tensor& grad_loss, const at::Tensor& student,
                                  const at::Tensor& teacher, const at::Tensor& student_lse,
                                  const at::Tensor& grad_scale, const at::Tensor& sparse_id,
                                  const at::Tensor& sparse_coef, bool full_vocab) {
  TORCH_CHECK(student.dim() == 2, "opd_fast: student_logits must be (N, V)");
  check_logits_dtype(student, "student_logits");
  const int64_t rows = student.size(0);
  const auto acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto* t : {&grad_loss, &student_lse, &grad_scale}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == rows && t->scalar_type() == acc_dtype &&
                    t->device() == student.device(),
                "opd_fast: backward row tensors must be (N,) ", acc_dtype, " on ",
                student.device());
  }
  TORCH_CHECK(sparse_id.dim() == 2 && sparse_id.size(0) == rows &&
                  sparse_id.scalar_type() == at::kLong && sparse_id.device() == student.device(),
              "opd_fast: sparse_id must be (N, W) int64");
  TORCH_CHECK(sparse_coef.sizes() == sparse_id.sizes() && sparse_coef.scalar_type() == acc_dtype &&
                  sparse_coef.device() == student.device(),
              "opd_fast: sparse_coef must match sparse_id");
  if (full_vocab) {
    TORCH_CHECK(teacher.sizes() == student.sizes() &&
                    teacher.scalar_type() == student.scalar_type() &&
                    teacher.device() == student.device(),
                "opd_fast: full_vocab backward needs teacher_logits like student_logits");
  }
  return BackwardPlan{rows_contiguous(student),
                      full_vocab ? rows_contiguous(teacher) : at::Tensor(),
                      grad_loss.contiguous(),
                      student_lse.contiguous(),
                      grad_scale.contiguous(),
                      sparse_id.contiguous(),
                      sparse_coef.contiguous()};
}

}  // namespace opd_fast
