// The compiled module opd_fast._C. Importing it runs the TORCH_LIBRARY registrations in
// registration.cpp; Python then calls the ops through torch.ops.opd_fast. The module itself
// reports how it was built and the names C++ and Python share (kernels/names.h), which Python
// checks against its own lists at import.
#include <torch/extension.h>

#include <cstddef>

#include "kernels/cpu/kernels.h"
#include "kernels/names.h"
#include "launchers/cpu_workspace.h"

namespace {

template <size_t N>
pybind11::tuple names_tuple(const char* const (&names)[N]) {
  pybind11::tuple result(N);
  for (size_t i = 0; i < N; ++i) result[i] = pybind11::str(names[i]);
  return result;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "opd_fast compiled kernels (ops are registered under torch.ops.opd_fast)";
#ifdef OPD_FAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("torch_version") = OPD_FAST_TORCH_VERSION;  // the torch this was compiled against
  m.def("cpu_instruction_set", &opd_fast::cpu::instruction_set,
        "Instruction set the CPU kernels dispatch to on this machine");
  // The CPU backward's kept gradient block (launchers/cpu_workspace.h).
  m.def("cpu_workspace_bytes", &opd_fast::cpu_workspace_bytes,
        "Bytes of the gradient block the CPU backward keeps across calls (0: none)");
  m.def("cpu_workspace_in_use", &opd_fast::cpu_workspace_in_use,
        "Whether a gradient the CPU backward returned still holds its kept block");
  m.def("release_cpu_workspace", &opd_fast::release_cpu_workspace,
        "Free the CPU backward's kept gradient block (when no gradient holds it; else when "
        "the last one dies)");
  // In enum order: the index of a name is the value the kernels use.
  m.attr("variants") = names_tuple(opd_fast::kVariantNames);
  m.attr("estimators") = names_tuple(opd_fast::kEstimatorNames);
  m.attr("token_metric_names") = names_tuple(opd_fast::kMetricNames);
  m.attr("max_k") = opd_fast::kMaxK;
}
