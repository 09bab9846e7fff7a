// CPU implementations of opd_fast::opd_forward / opd_backward: checks, output allocation and
// a parallel loop over rows; the per-row work is in csrc/kernels/cpu/.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <cstdint>

#include "launchers/checks.h"
#include "kernels/cpu/kernels.h"

namespace opd_fast {
namespace {

cpu::ElementType element_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return cpu::ElementType::kFloat32;
    case at::kDouble: return cpu::ElementType::kFloat64;
    case at::kBFloat16: return cpu::ElementType::kBFloat16;
    case at::kHalf: return cpu::ElementType::kFloat16;
    default: TORCH_CHECK(false, "opd_fast: unsupported dtype ", dtype);
  }
}

// A fresh (N, V) gradient costs one page fault per 4 KiB on first write, which for large
// buffers takes longer than the kernel itself; ask for transparent huge pages instead.
void advise_huge_pages(const at::Tensor& t) {
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t aligned_begin = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t aligned_end = end & ~(kHuge - 1);
  if (aligned_end > aligned_begin) {
    madvise(reinterpret_cast<void*>(aligned_begin), aligned_end - aligned_begin, MADV_HUGEPAGE);
  }
#endif
}

using ForwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// What ForwardArgs and SparseForwardArgs share: the student rows, optional inputs, settings
// and output pointers.
template <typename Args>
void set_forward_args(Args& args, const ForwardPlan& plan, double temperature,
                      ForwardOutputTensors& outputs) {
  args.dtype = element_type(plan.student.scalar_type());
  args.student = plan.student.data_ptr();
  args.student_row_stride = plan.student.stride(0);
  args.vocab = plan.student.size(1);
  args.sampled_ids = plan.sampled_ids.defined() ? plan.sampled_ids.data_ptr<int64_t>() : nullptr;
  args.row_valid = plan.row_valid.defined() ? plan.row_valid.data_ptr<bool>() : nullptr;
  args.k = plan.k;
  args.variant = plan.variant;
  args.estimator = plan.estimator;
  args.temperature = temperature;
  args.out = cpu::ForwardOutputs{int(outputs.sparse_id.size(1)),  outputs.loss.data_ptr(),
                                 outputs.metrics.data_ptr(),      outputs.student_lse.data_ptr(),
                                 outputs.teacher_lse.data_ptr(),  outputs.grad_scale.data_ptr(),
                                 outputs.sparse_id.data_ptr<int64_t>(),
                                 outputs.sparse_coef.data_ptr()};
}

// Rows are ~V exps each; a grain of a few rows keeps threads busy without much overhead.
constexpr int64_t kRowGrain = 4;

ForwardResult opd_forward_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                const c10::optional<at::Tensor>& sampled_ids,
                const c10::optional<at::Tensor>& row_valid, int64_t k, c10::string_view variant,
                c10::string_view estimator, double temperature) {
  const ForwardPlan plan =
      plan_forward(student_logits, teacher_logits, sampled_ids, row_valid, k,
                   std::string(variant), std::string(estimator), temperature);
  const int64_t rows = plan.student.size(0);
  ForwardOutputTensors outputs(rows, plan);

  cpu::ForwardArgs args{};
  set_forward_args(args, plan, temperature, outputs);
  args.teacher = plan.teacher.data_ptr();
  args.teacher_row_stride = plan.teacher.stride(0);
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    cpu::run_rows(args, begin, end);
  });
  return outputs.as_tuple();
}

at::Tensor opd_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                            const at::Tensor& teacher_logits, const at::Tensor& student_lse,
                            const at::Tensor& grad_scale, const at::Tensor& sparse_id,
                            const at::Tensor& sparse_coef, double temperature, bool full_vocab) {
  const BackwardPlan plan = plan_backward(grad_loss, student_logits, teacher_logits, student_lse,
                                          grad_scale, sparse_id, sparse_coef, full_vocab);
  const at::Tensor& student = plan.student;
  at::Tensor grad_student = at::empty(student.sizes(), student.options());
  advise_huge_pages(grad_student);
  const int64_t rows = student.size(0);

  cpu::BackwardArgs args{};
  args.dtype = element_type(student.scalar_type());
  args.student = student.data_ptr();
  args.teacher = full_vocab ? plan.teacher.data_ptr() : nullptr;
  args.student_row_stride = student.stride(0);
  args.teacher_row_stride = full_vocab ? plan.teacher.stride(0) : 0;
  args.vocab = student.size(1);
  args.temperature = temperature;
  args.full_vocab = full_vocab;
  args.grad_loss = plan.grad_loss.data_ptr();
  args.student_lse = plan.student_lse.data_ptr();
  args.grad_scale = plan.grad_scale.data_ptr();
  args.sparse_id = plan.sparse_id.data_ptr<int64_t>();
  args.sparse_coef = plan.sparse_coef.data_ptr();
  args.sparse_width = int(plan.sparse_id.size(1));
  args.grad_student = grad_student.data_ptr();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    cpu::run_rows(args, begin, end);
  });
  return grad_student;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_topk_cpu(const at::Tensor& logits,
                                                                        int64_t k,
                                                                        double temperature) {
  const RowTopkPlan plan = plan_row_topk(logits, k, temperature);
  const at::Tensor& rows_in = plan.logits;
  const int64_t rows = rows_in.size(0);
  cpu::TopkArgs args{};
  args.dtype = element_type(rows_in.scalar_type());
  args.logits = rows_in.data_ptr();
  args.row_stride = rows_in.stride(0);
  args.vocab = rows_in.size(1);
  args.k = plan.k;
  args.temperature = temperature;
  args.ids = plan.ids.data_ptr<int64_t>();
  args.log_probs = plan.log_probs.data_ptr();
  args.lse = plan.lse.data_ptr();
  args.entropy = plan.entropy.data_ptr();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    cpu::run_rows(args, begin, end);
  });
  return plan.as_tuple();
}

ForwardResult opd_forward_sparse_cpu(
    const at::Tensor& student_logits, const at::Tensor& student_topk_ids,
    const at::Tensor& teacher_topk_ids, const at::Tensor& teacher_topk_log_probs,
    const at::Tensor& teacher_log_probs_at_student, const at::Tensor& teacher_entropy,
    const c10::optional<at::Tensor>& sampled_ids,
    const c10::optional<at::Tensor>& teacher_sampled_log_probs,
    const c10::optional<at::Tensor>& row_valid, int64_t k, c10::string_view variant,
    c10::string_view estimator, double temperature) {
  const SparseForwardPlan plan = plan_forward_sparse(
      student_logits, student_topk_ids, teacher_topk_ids, teacher_topk_log_probs,
      teacher_log_probs_at_student, teacher_entropy, sampled_ids, teacher_sampled_log_probs,
      row_valid, k, std::string(variant), std::string(estimator), temperature);
  const int64_t rows = plan.student.size(0);
  ForwardOutputTensors outputs(rows, plan);

  cpu::SparseForwardArgs args{};
  set_forward_args(args, plan, temperature, outputs);
  args.student_topk_ids = plan.student_topk_ids.data_ptr<int64_t>();
  args.teacher_topk_ids = plan.teacher_topk_ids.data_ptr<int64_t>();
  args.teacher_topk_log_probs = plan.teacher_topk_log_probs.data_ptr();
  args.teacher_log_probs_at_student = plan.teacher_log_probs_at_student.data_ptr();
  args.teacher_entropy = plan.teacher_entropy.data_ptr();
  args.teacher_sampled_log_probs = plan.teacher_sampled_log_probs.defined()
                                       ? plan.teacher_sampled_log_probs.data_ptr()
                                       : nullptr;
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    cpu::run_rows(args, begin, end);
  });
  return outputs.as_tuple();
}

}  // namespace

TORCH_LIBRARY_IMPL(opd_fast, CPU, m) {
  m.impl("opd_forward", &opd_forward_cpu);
  m.impl("opd_backward", &opd_backward_cpu);
  m.impl("row_topk", &row_topk_cpu);
  m.impl("opd_forward_sparse", &opd_forward_sparse_cpu);
}

}  // namespace opd_fast
