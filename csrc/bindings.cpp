// The compiled module opd_fast._C. Importing it runs the TORCH_LIBRARY registrations in
// registration.cpp, launchers/cpu.cpp and (when built) launchers/cuda.cu; Python then calls the ops
// through torch.ops.opd_fast. The module itself only reports how it was built.
#include <torch/extension.h>

#include "kernels/cpu/kernels.h"

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
}
