// CUDA launchers of the opd_fast ops: device guard, current stream, output allocation and dtype
// dispatch around the torch-free kernels (csrc/kernels/cuda/opd_{forward,backward,sparse}.cuh,
// instantiated in cuda_kernels_<dtype>.cu); the checks are in checks.h.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "launchers/cuda_instances.h"
#include "launchers/kernel_args.h"
#include "launchers/launchers.h"

namespace opd_fast {
namespace kernels {
// Instantiated in cuda_kernels_<dtype>.cu, compiled in parallel with this file.
OPD_FAST_CUDA_LAUNCHES(extern, float)
OPD_FAST_CUDA_LAUNCHES(extern, double)
OPD_FAST_CUDA_LAUNCHES(extern, __nv_bfloat16)
OPD_FAST_CUDA_LAUNCHES(extern, __half)
}  // namespace kernels

namespace {

constexpr int64_t kMaxRowsOrVocab = 0x7fffffff;  // grid.x and the 31-bit ids of the top-k keys

// The CUDA element type behind an ATen dtype (c10::BFloat16 / c10::Half are bit-compatible).
template <typename F>
void dispatch_logits_dtype(at::ScalarType dtype, F&& body) {
  switch (dtype) {
    case at::kFloat: body(float{}); return;
    case at::kDouble: body(double{}); return;
    case at::kBFloat16: body(__nv_bfloat16{}); return;
    case at::kHalf: body(__half{}); return;
    default: TORCH_CHECK(false, "opd_fast: unsupported dtype ", dtype);
  }
}

const at::Tensor& check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "opd_fast: ", name, " must be a CUDA tensor, got ", t.device());
  return t;
}

// What every CUDA launcher does first: checks that `logits` is a CUDA tensor whose N and
// `columns` (V, or the backward's sparse width) fit the kernels' 31 bits, makes its device
// current for the scope and takes that device's current stream.
class CudaScope {
 public:
  CudaScope(const at::Tensor& logits, const char* name, int64_t columns, const char* columns_name)
      : guard_(check_cuda(logits, name).device()),
        stream(c10::cuda::getCurrentCUDAStream(logits.device().index())) {
    TORCH_CHECK(logits.size(0) <= kMaxRowsOrVocab && columns <= kMaxRowsOrVocab,
                "opd_fast: the CUDA kernels need N and ", columns_name, " below 2^31, got N=",
                logits.size(0), " and ", columns);
  }

 private:
  const c10::cuda::CUDAGuard guard_;

 public:
  const cudaStream_t stream;
};

// Fills Params<scalar_t> for the logits' dtype from the plan and runs its kernel
// (kernels::launch, overloaded on the Params type); nothing to do for empty logits.
template <template <typename> class Params, typename Plan, typename Outputs>
void run_on_cuda(const Plan& plan, const at::Tensor& logits, const Outputs& outputs,
                 const CudaScope& scope) {
  if (logits.numel() == 0) return;
  dispatch_logits_dtype(logits.scalar_type(), [&](auto element) {
    using scalar_t = decltype(element);
    using acc_t = typename kernels::Element<scalar_t>::acc_t;
    Params<scalar_t> params{};
    params.rows = logits.size(0);
    params.inv_tau = acc_t(1) / acc_t(plan.temperature);
    fill_args(params, plan, outputs);
    C10_CUDA_CHECK(kernels::launch(params, scope.stream));
  });
}

// An op whose outputs are one of checks.h's output structs.
template <template <typename> class Params, typename Outputs, typename Plan>
auto outputs_on_cuda(const Plan& plan, const at::Tensor& logits, const char* name) {
  const CudaScope scope(logits, name, logits.size(1), "V");
  const Outputs outputs(plan);
  run_on_cuda<Params>(plan, logits, outputs, scope);
  return outputs.as_tuple();
}

}  // namespace

template <>
ForwardResult Launchers<Backend::kCuda>::opd_forward(const ForwardPlan& plan) {
  return outputs_on_cuda<kernels::ForwardParams, ForwardOutputTensors>(plan, plan.student,
                                                                       "student_logits");
}

template <>
at::Tensor Launchers<Backend::kCuda>::opd_backward(const BackwardPlan& plan) {
  const CudaScope scope(plan.student, "student_logits", plan.sparse_id.size(1),
                        "the sparse width");
  const at::Tensor grad_student = at::empty(plan.student.sizes(), plan.student.options());
  run_on_cuda<kernels::BackwardParams>(plan, plan.student, grad_student, scope);
  return grad_student;
}

template <>
RowTopkResult Launchers<Backend::kCuda>::row_topk(const RowTopkPlan& plan) {
  return outputs_on_cuda<kernels::TopkParams, RowTopkOutputTensors>(plan, plan.logits, "logits");
}

template <>
ForwardResult Launchers<Backend::kCuda>::opd_forward_sparse(const SparseForwardPlan& plan) {
  return outputs_on_cuda<kernels::SparseForwardParams, ForwardOutputTensors>(plan, plan.student,
                                                                             "student_logits");
}

}  // namespace opd_fast
