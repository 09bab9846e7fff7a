// CPU launchers of the opd_fast ops: output allocation and a parallel loop over rows around the
// torch-free row kernels (csrc/kernels/cpu/); the checks are in checks.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <sys/mman.h>

#include <cstdint>

#include "kernels/cpu/kernels.h"
#include "launchers/kernel_args.h"
#include "launchers/launchers.h"

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

// Rows are ~V exps each; a grain of a few rows keeps threads busy without much overhead.
constexpr int64_t kRowGrain = 4;

// Runs the kernel of Args (cpu::run_rows) over the rows of `logits`, in parallel.
template <typename Args, typename Plan, typename Outputs>
void run_on_cpu(const Plan& plan, const at::Tensor& logits, const Outputs& outputs) {
  Args args{};
  args.dtype = element_type(logits.scalar_type());
  args.temperature = plan.temperature;
  fill_args(args, plan, outputs);
  at::parallel_for(0, logits.size(0), kRowGrain, [&](int64_t begin, int64_t end) {
    cpu::run_rows(args, begin, end);
  });
}

// An op whose outputs are one of checks.h's output structs.
template <typename Args, typename Outputs, typename Plan>
auto outputs_on_cpu(const Plan& plan, const at::Tensor& logits) {
  const Outputs outputs(plan);
  run_on_cpu<Args>(plan, logits, outputs);
  return outputs.as_tuple();
}

}  // namespace

template <>
ForwardResult Launchers<Backend::kCpu>::opd_forward(const ForwardPlan& plan) {
  return outputs_on_cpu<cpu::ForwardArgs, ForwardOutputTensors>(plan, plan.student);
}

template <>
at::Tensor Launchers<Backend::kCpu>::opd_backward(const BackwardPlan& plan) {
  at::Tensor grad_student = at::empty(plan.student.sizes(), plan.student.options());
  advise_huge_pages(grad_student);
  run_on_cpu<cpu::BackwardArgs>(plan, plan.student, grad_student);
  return grad_student;
}

template <>
RowTopkResult Launchers<Backend::kCpu>::row_topk(const RowTopkPlan& plan) {
  return outputs_on_cpu<cpu::TopkArgs, RowTopkOutputTensors>(plan, plan.logits);
}

template <>
ForwardResult Launchers<Backend::kCpu>::opd_forward_sparse(const SparseForwardPlan& plan) {
  return outputs_on_cpu<cpu::SparseForwardArgs, ForwardOutputTensors>(plan, plan.student);
}

}  // namespace opd_fast
