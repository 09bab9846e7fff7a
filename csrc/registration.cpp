// The opd_fast operators: their schemas, and each backend's kernel for them. A kernel is the
// op's checks (plan_* in launchers/checks.h, whose signature is the op's) followed by that
// backend's launcher (launchers/cpu.cpp, launchers/cuda.cu) on the checked plan.
#include <torch/library.h>

#include "launchers/checks.h"
#include "launchers/launchers.h"

namespace opd_fast {
namespace {

// Op<&plan_x, &Launchers<B>::x>::run(args...) = Launchers<B>::x(plan_x(args...)).
template <auto kPlan, auto kLaunch, typename PlanSignature = decltype(kPlan)>
struct Op;

template <auto kPlan, auto kLaunch, typename Plan, typename... Args>
struct Op<kPlan, kLaunch, Plan (*)(Args...)> {
  static auto run(Args... args) { return kLaunch(kPlan(args...)); }
};

template <Backend kBackend>
void register_kernels(torch::Library& m) {
  using L = Launchers<kBackend>;
  m.impl("opd_forward", &Op<&plan_forward, &L::opd_forward>::run);
  m.impl("opd_backward", &Op<&plan_backward, &L::opd_backward>::run);
  m.impl("row_topk", &Op<&plan_row_topk, &L::row_topk>::run);
  m.impl("opd_forward_sparse", &Op<&plan_forward_sparse, &L::opd_forward_sparse>::run);
}

}  // namespace
}  // namespace opd_fast

TORCH_LIBRARY(opd_fast, m) {
  // One streaming pass over both (N, V) logits: per-row loss, metrics and what the backward
  // needs (student log-partition, C, and the <= 2k sparse gradient coefficients).
  m.def(
      "opd_forward(Tensor student_logits, Tensor teacher_logits, Tensor? sampled_ids, "
      "Tensor? row_valid, int k, str variant, str estimator, float temperature) -> "
      "(Tensor loss, Tensor metrics, Tensor student_lse, Tensor teacher_lse, "
      "Tensor grad_scale, Tensor sparse_id, Tensor sparse_coef, Tensor student_max, "
      "Tensor student_log_norm)");
  // One pass over the student logits (and the teacher's for full_vocab): d loss / d z.
  m.def(
      "opd_backward(Tensor grad_loss, Tensor student_logits, Tensor teacher_logits, "
      "Tensor student_max, Tensor student_log_norm, Tensor grad_scale, Tensor sparse_id, "
      "Tensor sparse_coef, "
      "float temperature, bool full_vocab, bool sparse_is_gradient) -> Tensor");
  // Exact top-k (ties -> lower id) with log softmax(x / tau) at those ids, the row's
  // log-partition and entropy, in one pass: a teacher's payload, a student's requested ids.
  m.def(
      "row_topk(Tensor logits, int k, float temperature) -> "
      "(Tensor ids, Tensor log_probs, Tensor lse, Tensor entropy)");
  // opd_forward with the teacher given as a payload (docs/math.md, Teacher payload) instead of
  // logits; every variant but full_vocab. Same outputs (teacher_lse is 0).
  m.def(
      "opd_forward_sparse(Tensor student_logits, Tensor student_topk_ids, "
      "Tensor teacher_topk_ids, Tensor teacher_topk_log_probs, "
      "Tensor teacher_log_probs_at_student, Tensor teacher_entropy, Tensor? sampled_ids, "
      "Tensor? teacher_sampled_log_probs, Tensor? row_valid, int k, str variant, "
      "str estimator, float temperature) -> "
      "(Tensor loss, Tensor metrics, Tensor student_lse, Tensor teacher_lse, "
      "Tensor grad_scale, Tensor sparse_id, Tensor sparse_coef, Tensor student_max, "
      "Tensor student_log_norm)");
}

TORCH_LIBRARY_IMPL(opd_fast, CPU, m) { opd_fast::register_kernels<opd_fast::Backend::kCpu>(m); }

#ifdef OPD_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(opd_fast, CUDA, m) { opd_fast::register_kernels<opd_fast::Backend::kCuda>(m); }
#endif
