// CUDA implementations of opd_fast::opd_forward / opd_backward / row_topk /
// opd_forward_sparse: device guard, current stream and dtype dispatch around the checks and
// output allocation shared with the CPU launchers (checks.h); the kernels are in
// csrc/kernels/cuda/opd_{forward,backward,sparse}.cuh.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>

#include "launchers/checks.h"
#include "kernels/cuda/opd_backward.cuh"
#include "kernels/cuda/opd_forward.cuh"
#include "kernels/cuda/opd_sparse.cuh"

namespace opd_fast {
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

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "opd_fast: ", name, " must be a CUDA tensor, got ", t.device());
}

// What ForwardParams and SparseForwardParams share: the student rows, optional inputs,
// settings and output pointers.
template <typename Params>
void set_forward_params(Params& params, const ForwardPlan& plan, double temperature,
                        ForwardOutputTensors& out) {
  using scalar_t = std::remove_const_t<std::remove_pointer_t<decltype(params.student)>>;
  using acc_t = std::remove_pointer_t<decltype(params.loss)>;
  params.student = static_cast<const scalar_t*>(plan.student.data_ptr());
  params.student_row_stride = plan.student.stride(0);
  params.rows = plan.student.size(0);
  params.vocab = plan.student.size(1);
  params.sampled_ids = plan.sampled_ids.defined() ? plan.sampled_ids.data_ptr<int64_t>() : nullptr;
  params.row_valid = plan.row_valid.defined() ? plan.row_valid.data_ptr<bool>() : nullptr;
  params.k = plan.k;
  params.variant = plan.variant;
  params.estimator = plan.estimator;
  params.inv_tau = acc_t(1) / acc_t(temperature);
  params.sparse_width = plan.sparse_width;
  params.loss = static_cast<acc_t*>(out.loss.data_ptr());
  params.metrics = static_cast<acc_t*>(out.metrics.data_ptr());
  params.student_lse = static_cast<acc_t*>(out.student_lse.data_ptr());
  params.teacher_lse = static_cast<acc_t*>(out.teacher_lse.data_ptr());
  params.grad_scale = static_cast<acc_t*>(out.grad_scale.data_ptr());
  params.sparse_id = out.sparse_id.data_ptr<int64_t>();
  params.sparse_coef = static_cast<acc_t*>(out.sparse_coef.data_ptr());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
opd_forward_cuda(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                 const c10::optional<at::Tensor>& sampled_ids,
                 const c10::optional<at::Tensor>& row_valid, int64_t k, c10::string_view variant,
                 c10::string_view estimator, double temperature) {
  const ForwardPlan plan =
      plan_forward(student_logits, teacher_logits, sampled_ids, row_valid, k,
                   std::string(variant), std::string(estimator), temperature);
  check_cuda(plan.student, "student_logits");
  const c10::cuda::CUDAGuard device_guard(plan.student.device());
  const int64_t rows = plan.student.size(0);
  const int64_t vocab = plan.student.size(1);
  TORCH_CHECK(rows <= kMaxRowsOrVocab && vocab <= kMaxRowsOrVocab,
              "opd_fast: the CUDA kernels need N and V below 2^31, got ", plan.student.sizes());
  ForwardOutputTensors out(rows, plan);
  if (rows == 0) {
    return out.as_tuple();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(plan.student.device().index());

  dispatch_logits_dtype(plan.student.scalar_type(), [&](auto element) {
    using scalar_t = decltype(element);
    using acc_t = typename kernels::Element<scalar_t>::acc_t;
    kernels::ForwardParams<scalar_t> params{};
    set_forward_params(params, plan, temperature, out);
    params.teacher = static_cast<const scalar_t*>(plan.teacher.data_ptr());
    params.teacher_row_stride = plan.teacher.stride(0);
    C10_CUDA_CHECK(kernels::launch_opd_forward(params, stream));
  });
  return out.as_tuple();
}

at::Tensor opd_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                             const at::Tensor& teacher_logits, const at::Tensor& student_lse,
                             const at::Tensor& grad_scale, const at::Tensor& sparse_id,
                             const at::Tensor& sparse_coef, double temperature,
                             bool full_vocab) {
  const BackwardPlan plan = plan_backward(grad_loss, student_logits, teacher_logits, student_lse,
                                          grad_scale, sparse_id, sparse_coef, full_vocab);
  check_cuda(plan.student, "student_logits");
  const c10::cuda::CUDAGuard device_guard(plan.student.device());
  const at::Tensor& student = plan.student;
  at::Tensor grad_student = at::empty(student.sizes(), student.options());
  const int64_t rows = student.size(0);
  const int64_t vocab = student.size(1);
  TORCH_CHECK(rows <= kMaxRowsOrVocab && plan.sparse_id.size(1) <= kMaxRowsOrVocab,
              "opd_fast: the CUDA kernels need N and the sparse width below 2^31");
  if (grad_student.numel() == 0) return grad_student;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(student.device().index());

  dispatch_logits_dtype(student.scalar_type(), [&](auto element) {
    using scalar_t = decltype(element);
    using acc_t = typename kernels::Element<scalar_t>::acc_t;
    kernels::BackwardParams<scalar_t> params{};
    params.student = static_cast<const scalar_t*>(student.data_ptr());
    params.teacher = full_vocab ? static_cast<const scalar_t*>(plan.teacher.data_ptr()) : nullptr;
    params.student_row_stride = student.stride(0);
    params.teacher_row_stride = full_vocab ? plan.teacher.stride(0) : 0;
    params.rows = rows;
    params.vocab = vocab;
    params.inv_tau = acc_t(1) / acc_t(temperature);
    params.full_vocab = full_vocab;
    params.grad_loss = static_cast<const acc_t*>(plan.grad_loss.data_ptr());
    params.student_lse = static_cast<const acc_t*>(plan.student_lse.data_ptr());
    params.grad_scale = static_cast<const acc_t*>(plan.grad_scale.data_ptr());
    params.sparse_id = plan.sparse_id.data_ptr<int64_t>();
    params.sparse_coef = static_cast<const acc_t*>(plan.sparse_coef.data_ptr());
    params.sparse_width = static_cast<int>(plan.sparse_id.size(1));
    params.grad_student = static_cast<scalar_t*>(grad_student.data_ptr());
    C10_CUDA_CHECK(kernels::launch_opd_backward(params, stream));
  });
  return grad_student;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_topk_cuda(const at::Tensor& logits,
                                                                         int64_t k,
                                                                         double temperature) {
  check_cuda(logits, "logits");
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const RowTopkPlan plan = plan_row_topk(logits, k, temperature);
  const at::Tensor& rows_in = plan.logits;
  const int64_t rows = rows_in.size(0);
  const int64_t vocab = rows_in.size(1);
  TORCH_CHECK(rows <= kMaxRowsOrVocab && vocab <= kMaxRowsOrVocab,
              "opd_fast: the CUDA kernels need N and V below 2^31, got ", rows_in.sizes());
  if (rows == 0) return plan.as_tuple();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(rows_in.device().index());

  dispatch_logits_dtype(rows_in.scalar_type(), [&](auto element) {
    using scalar_t = decltype(element);
    using acc_t = typename kernels::Element<scalar_t>::acc_t;
    kernels::TopkParams<scalar_t> params{};
    params.logits = static_cast<const scalar_t*>(rows_in.data_ptr());
    params.row_stride = rows_in.stride(0);
    params.rows = rows;
    params.vocab = vocab;
    params.k = plan.k;
    params.inv_tau = acc_t(1) / acc_t(temperature);
    params.ids = plan.ids.data_ptr<int64_t>();
    params.log_probs = static_cast<acc_t*>(plan.log_probs.data_ptr());
    params.lse = static_cast<acc_t*>(plan.lse.data_ptr());
    params.entropy = static_cast<acc_t*>(plan.entropy.data_ptr());
    C10_CUDA_CHECK(kernels::launch_row_topk(params, stream));
  });
  return plan.as_tuple();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
opd_forward_sparse_cuda(const at::Tensor& student_logits, const at::Tensor& student_topk_ids,
                        const at::Tensor& teacher_topk_ids,
                        const at::Tensor& teacher_topk_log_probs,
                        const at::Tensor& teacher_log_probs_at_student,
                        const at::Tensor& teacher_entropy,
                        const c10::optional<at::Tensor>& sampled_ids,
                        const c10::optional<at::Tensor>& teacher_sampled_log_probs,
                        const c10::optional<at::Tensor>& row_valid, int64_t k,
                        c10::string_view variant, c10::string_view estimator,
                        double temperature) {
  const SparseForwardPlan plan = plan_forward_sparse(
      student_logits, student_topk_ids, teacher_topk_ids, teacher_topk_log_probs,
      teacher_log_probs_at_student, teacher_entropy, sampled_ids, teacher_sampled_log_probs,
      row_valid, k, std::string(variant), std::string(estimator), temperature);
  check_cuda(plan.student, "student_logits");
  const c10::cuda::CUDAGuard device_guard(plan.student.device());
  const int64_t rows = plan.student.size(0);
  const int64_t vocab = plan.student.size(1);
  TORCH_CHECK(rows <= kMaxRowsOrVocab && vocab <= kMaxRowsOrVocab,
              "opd_fast: the CUDA kernels need N and V below 2^31, got ", plan.student.sizes());
  ForwardOutputTensors out(rows, plan);
  if (rows == 0) {
    return out.as_tuple();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(plan.student.device().index());

  dispatch_logits_dtype(plan.student.scalar_type(), [&](auto element) {
    using scalar_t = decltype(element);
    using acc_t = typename kernels::Element<scalar_t>::acc_t;
    kernels::SparseForwardParams<scalar_t> params{};
    set_forward_params(params, plan, temperature, out);
    params.student_topk_ids = plan.student_topk_ids.data_ptr<int64_t>();
    params.teacher_topk_ids = plan.teacher_topk_ids.data_ptr<int64_t>();
    params.teacher_topk_log_probs = static_cast<const acc_t*>(plan.teacher_topk_log_probs.data_ptr());
    params.teacher_log_probs_at_student =
        static_cast<const acc_t*>(plan.teacher_log_probs_at_student.data_ptr());
    params.teacher_entropy = static_cast<const acc_t*>(plan.teacher_entropy.data_ptr());
    params.teacher_sampled_log_probs =
        plan.teacher_sampled_log_probs.defined()
            ? static_cast<const acc_t*>(plan.teacher_sampled_log_probs.data_ptr())
            : nullptr;
    C10_CUDA_CHECK(kernels::launch_opd_forward_sparse(params, stream));
  });
  return out.as_tuple();
}

}  // namespace

TORCH_LIBRARY_IMPL(opd_fast, CUDA, m) {
  m.impl("opd_forward", &opd_forward_cuda);
  m.impl("opd_backward", &opd_backward_cuda);
  m.impl("row_topk", &row_topk_cuda);
  m.impl("opd_forward_sparse", &opd_forward_sparse_cuda);
}

}  // namespace opd_fast
