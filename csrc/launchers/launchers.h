// The launchers of each backend: run the kernels for one checked plan (checks.h) and return
// the op's outputs. Launchers<Backend::kCpu> is defined in cpu.cpp, Launchers<Backend::kCuda>
// in cuda.cu (CUDA builds only); registration.cpp binds them to the ops.
#pragma once

#include <tuple>

#include <ATen/ATen.h>

#include "launchers/checks.h"

namespace opd_fast {

enum class Backend { kCpu, kCuda };

using ForwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using RowTopkResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <Backend kBackend>
struct Launchers {
  static ForwardResult opd_forward(const ForwardPlan& plan);
  static at::Tensor opd_backward(const BackwardPlan& plan);
  static RowTopkResult row_topk(const RowTopkPlan& plan);
  static ForwardResult opd_forward_sparse(const SparseForwardPlan& plan);
};

}  // namespace opd_fast
