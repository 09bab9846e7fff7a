// Argument checks, parsing and output allocation shared by the CPU and CUDA launchers of the
// opd_fast ops: one plan_* per op, whose signature is the op's (registration.cpp). The Python
// wrapper checks first with friendlier messages; these keep direct torch.ops callers from ever
// reaching a kernel with shapes that would read out of bounds.
#pragma once

#include <cmath>
#include <cstddef>
#include <string>
#include <tuple>

#include <ATen/ATen.h>

#include "kernels/names.h"

namespace opd_fast {

// The enum value named `name` in `names` (kernels/names.h), or an error listing the names.
template <typename Enum, size_t N>
Enum parse_name(const std::string& name, const char* const (&names)[N], const char* what) {
  for (size_t i = 0; i < N; ++i) {
    if (name == names[i]) return Enum(i);
  }
  std::string expected = names[0];
  for (size_t i = 1; i < N; ++i) expected += std::string(i + 1 < N ? ", " : " or ") + names[i];
  TORCH_CHECK(false, "opd_fast: unknown ", what, " '", name, "'; expected ", expected);
}

inline Variant parse_variant(const std::string& name) {
  return parse_name<Variant>(name, kVariantNames, "variant");
}

inline Estimator parse_estimator(const std::string& name) {
  return parse_name<Estimator>(name, kEstimatorNames, "estimator");
}

inline void check_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "opd_fast: ", name, " must be (N, V), got ", t.sizes());
}

inline void check_logits_dtype(const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                  dtype == at::kHalf,
              "opd_fast: ", name, " must be float32, float64, bfloat16 or float16, got ", dtype);
}

inline void check_k_and_temperature(int64_t k, int64_t vocab, double temperature) {
  TORCH_CHECK(k >= 1 && k <= vocab && k <= kMaxK, "opd_fast: k must be in [1, min(V, ", kMaxK,
              ")], got k=", k, " with V=", vocab);
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature),
              "opd_fast: temperature must be positive and finite, got ", temperature);
}

// An optional per-row input: (N,) of `dtype` (called `dtype_name`) on the logits' device.
inline void check_row_input(const c10::optional<at::Tensor>& t, const char* name,
                            at::ScalarType dtype, const char* dtype_name,
                            const at::Tensor& logits) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->scalar_type() == dtype, "opd_fast: ", name, " must be ", dtype_name, ", got ",
              t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == logits.size(0), "opd_fast: ", name,
              " must be (N,) = (", logits.size(0), ",), got ", t->sizes());
  TORCH_CHECK(t->device() == logits.device(), "opd_fast: ", name, " on ", t->device(),
              " but logits on ", logits.device());
}

inline at::ScalarType accumulation_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The kernels scale shifted logits by 1 / tau in the accumulation type (float unless the
// logits are float64). Below about 2.9e-39 (float) that inverse overflows and no log-prob
// can be formed, so such a tau is refused by name instead of giving inf or NaN.
inline void check_temperature_range(double temperature, const at::Tensor& logits) {
  const bool fits = accumulation_dtype(logits) == at::kDouble
                        ? std::isfinite(1.0 / temperature)
                        : float(temperature) > 0.0f && std::isfinite(1.0f / float(temperature));
  TORCH_CHECK(fits, "opd_fast: temperature ", temperature, " is too small for ",
              logits.scalar_type(), " logits: 1 / temperature overflows the ",
              accumulation_dtype(logits), " accumulation (use temperature >= ",
              accumulation_dtype(logits) == at::kDouble ? 6e-309 : 3e-39, ")");
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
  double temperature;
};

// The sparse-teacher forward adds the teacher's payload (docs/math.md, Teacher payload), contiguous.
struct SparseForwardPlan : ForwardPlan {
  at::Tensor student_topk_ids, teacher_topk_ids, teacher_topk_log_probs,
      teacher_log_probs_at_student, teacher_entropy;
  at::Tensor teacher_sampled_log_probs;  // (N,) or undefined, given with sampled_ids
};

inline ForwardPlan plan_forward(const at::Tensor& student, const at::Tensor& teacher,
                                const c10::optional<at::Tensor>& sampled_ids,
                                const c10::optional<at::Tensor>& row_valid, int64_t k,
                                c10::string_view variant, c10::string_view estimator,
                                double temperature) {
  check_matrix(student, "student_logits");
  TORCH_CHECK(teacher.sizes() == student.sizes(), "opd_fast: teacher_logits shape ",
              teacher.sizes(), " != student_logits shape ", student.sizes());
  check_logits_dtype(student, "student_logits");
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(),
              "opd_fast: teacher_logits dtype ", teacher.scalar_type(),
              " != student_logits dtype ", student.scalar_type());
  TORCH_CHECK(teacher.device() == student.device(), "opd_fast: teacher_logits on ",
              teacher.device(), " but student_logits on ", student.device());
  check_k_and_temperature(k, student.size(1), temperature);
  check_temperature_range(temperature, student);
  const Variant parsed_variant = parse_variant(std::string(variant));
  const Estimator parsed_estimator = parse_estimator(std::string(estimator));
  TORCH_CHECK(!(parsed_variant == Variant::kSampledToken && parsed_estimator == Estimator::kExact),
              "opd_fast: estimator 'exact' has no form for variant 'sampled_token'");
  TORCH_CHECK(parsed_variant != Variant::kSampledToken || sampled_ids.has_value(),
              "opd_fast: variant 'sampled_token' needs sampled_ids");
  check_row_input(sampled_ids, "sampled_ids", at::kLong, "int64", student);
  check_row_input(row_valid, "row_valid", at::kBool, "bool", student);
  return ForwardPlan{rows_contiguous(student),
                     rows_contiguous(teacher),
                     contiguous_or_undefined(sampled_ids),
                     contiguous_or_undefined(row_valid),
                     parsed_variant,
                     parsed_estimator,
                     int(k),
                     int(2 * k),
                     accumulation_dtype(student),
                     temperature};
}

// Checks of the sparse-teacher forward; returns the plan like plan_forward (teacher unset).
inline SparseForwardPlan plan_forward_sparse(
    const at::Tensor& student, const at::Tensor& student_topk_ids,
    const at::Tensor& teacher_topk_ids, const at::Tensor& teacher_topk_log_probs,
    const at::Tensor& teacher_log_probs_at_student, const at::Tensor& teacher_entropy,
    const c10::optional<at::Tensor>& sampled_ids,
    const c10::optional<at::Tensor>& teacher_sampled_log_probs,
    const c10::optional<at::Tensor>& row_valid, int64_t k, c10::string_view variant,
    c10::string_view estimator, double temperature) {
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

// The nine outputs of opd_forward / opd_forward_sparse.
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                 at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct ForwardOutputTensors {
  at::Tensor loss, metrics, student_lse, teacher_lse, grad_scale, sparse_id, sparse_coef,
      student_max, student_log_norm;

  explicit ForwardOutputTensors(const ForwardPlan& plan) {
    const int64_t rows = plan.student.size(0);
    const auto options = plan.student.options().dtype(plan.acc_dtype);
    loss = at::empty({rows}, options);
    metrics = at::empty({rows, kNumMetrics}, options);
    student_lse = at::empty({rows}, options);
    teacher_lse = at::empty({rows}, options);
    grad_scale = at::empty({rows}, options);
    sparse_id = at::empty({rows, plan.sparse_width}, options.dtype(at::kLong));
    sparse_coef = at::empty({rows, plan.sparse_width}, options);
    student_max = at::empty({rows}, options);
    student_log_norm = at::empty({rows}, options);
  }

  ForwardResult as_tuple() const {
    return {loss,      metrics,     student_lse, teacher_lse,     grad_scale,
            sparse_id, sparse_coef, student_max, student_log_norm};
  }
};

// A checked row_topk call: the logits with rows contiguous.
struct RowTopkPlan {
  at::Tensor logits;
  int k;
  double temperature;
};

inline RowTopkPlan plan_row_topk(const at::Tensor& logits, int64_t k, double temperature) {
  check_matrix(logits, "logits");
  check_logits_dtype(logits, "logits");
  check_k_and_temperature(k, logits.size(1), temperature);
  check_temperature_range(temperature, logits);
  return RowTopkPlan{rows_contiguous(logits), int(k), temperature};
}

// The four outputs of row_topk.
struct RowTopkOutputTensors {
  at::Tensor ids, log_probs, lse, entropy;

  explicit RowTopkOutputTensors(const RowTopkPlan& plan) {
    const int64_t rows = plan.logits.size(0);
    const auto options = plan.logits.options().dtype(accumulation_dtype(plan.logits));
    ids = at::empty({rows, plan.k}, options.dtype(at::kLong));
    log_probs = at::empty({rows, plan.k}, options);
    lse = at::empty({rows}, options);
    entropy = at::empty({rows}, options);
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> as_tuple() const {
    return {ids, log_probs, lse, entropy};
  }
};

// A checked backward call: the inputs as the kernels read them (teacher only with full_vocab).
struct BackwardPlan {
  at::Tensor student, teacher, grad_loss, student_max, student_log_norm, grad_scale, sparse_id,
      sparse_coef;
  double temperature;
  bool full_vocab;
  bool sparse_is_gradient;
};

inline BackwardPlan plan_backward(const at::Tensor& grad_loss, const at::Tensor& student,
                                  const at::Tensor& teacher, const at::Tensor& student_max,
                                  const at::Tensor& student_log_norm,
                                  const at::Tensor& grad_scale, const at::Tensor& sparse_id,
                                  const at::Tensor& sparse_coef, double temperature,
                                  bool full_vocab, bool sparse_is_gradient) {
  check_matrix(student, "student_logits");
  check_logits_dtype(student, "student_logits");
  check_temperature_range(temperature, student);
  const int64_t rows = student.size(0);
  const auto acc_dtype = accumulation_dtype(student);
  for (const auto* t : {&grad_loss, &student_max, &student_log_norm, &grad_scale}) {
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
                      student_max.contiguous(),
                      student_log_norm.contiguous(),
                      grad_scale.contiguous(),
                      sparse_id.contiguous(),
                      sparse_coef.contiguous(),
                      temperature,
                      full_vocab,
                      sparse_is_gradient};
}

}  // namespace opd_fast
