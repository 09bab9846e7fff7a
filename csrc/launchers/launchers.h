// The launchers of each backend: run the kernels for one checked plan (checks.h) and return
// the op's outputs. Launchers<Backend::kCpu> is defined in cpu.cpp, Launchers<Backend::kCuda>
// in cuda.cu (CUDA builds only); registration.cpp binds them to the ops.
#pragma once

#include <tuple>

#include <ATen/ATen.h>

#include "launchers/checks.h"

namespace opd_fast {

enum class Backend { kCpu, kCuda };

using RowTopkResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <Backend kBackend>
struct Launchers {
  static ForwardResult opd_forward(const ForwardPlan& plan);
  static at::Tensor opd_backward(const BackwardPlan& plan);
  static RowTopkResult row_topk(const RowTopkPlan& plan);
  static ForwardResult opd_forward_sparse(const SparseForwardPlan& plan);
};

// Each backend defines its launchers as explicit specialisations (cpu.cpp, cuda.cu); the
// language asks for them to be declared before registration.cpp uses them.
// clang-format off
template <> ForwardResult Launchers<Backend::kCpu>::opd_forward(const ForwardPlan&);
template <> at::Tensor Launchers<Backend::kCpu>::opd_backward(const BackwardPlan&);
template <> RowTopkResult Launchers<Backend::kCpu>::row_topk(const RowTopkPlan&);
template <> ForwardResult Launchers<Backend::kCpu>::opd_forward_sparse(const SparseForwardPlan&);

template <> ForwardResult Launchers<Backend::kCuda>::opd_forward(const ForwardPlan&);
template <> at::Tensor Launchers<Backend::kCuda>::opd_backward(const BackwardPlan&);
template <> RowTopkResult Launchers<Backend::kCuda>::row_topk(const RowTopkPlan&);
template <> ForwardResult Launchers<Backend::kCuda>::opd_forward_sparse(const SparseForwardPlan&);
// clang-format on

}  // namespace opd_fast
