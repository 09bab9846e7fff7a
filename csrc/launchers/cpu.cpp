// CPU launchers of the opd_fast ops: output allocation and a parallel loop over rows around the
// torch-free row kernels (csrc/kernels/cpu/); the checks are in checks.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cpu/kernels.h"
#include "launchers/cpu_workspace.h"
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

// Rows are ~V exps each; a chunk of a few rows keeps threads busy without much overhead.
constexpr int64_t kRowGrain = 4;

// Runs the kernel of Args (cpu::run_rows) over the rows of `logits`, in parallel.
//
// Chunks of kRowGrain rows are handed out dynamically (OpenMP's schedule(dynamic)), not as one
// contiguous range per thread the way at::parallel_for does. With a static split every call
// waits for its slowest thread, and on a machine where another process shares a core that
// thread is descheduled for whole time slices: the op slowed 3-15x under one competing busy
// process while eager PyTorch slowed ~2x (bench/bench_cpu_load.py). Dynamic chunks let the
// threads that do run take over the rows of the one that does not. The thread count is torch's
// (torch.set_num_threads), never more than there are chunks. The region runs on the OpenMP
// runtime torch itself uses (one libgomp in the process), so it shares torch's thread team;
// its idle threads spin about 8 ms after a call before they sleep (libgomp's default).
template <typename Args, typename Plan, typename Outputs>
void run_on_cpu(const Plan& plan, const at::Tensor& logits, const Outputs& outputs) {
  Args args{};
  args.dtype = element_type(logits.scalar_type());
  args.temperature = plan.temperature;
  fill_args(args, plan, outputs);
  const int64_t rows = logits.size(0);
  const int64_t chunks = (rows + kRowGrain - 1) / kRowGrain;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  if (threads <= 1 || at::in_parallel_region()) {
    cpu::run_rows(args, 0, rows);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(int(threads))
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t begin = chunk * kRowGrain;
    cpu::run_rows(args, begin, std::min(begin + kRowGrain, rows));
  }
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
  at::Tensor grad_student = cpu_gradient_buffer(plan.student.sizes(), plan.student.options());
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
