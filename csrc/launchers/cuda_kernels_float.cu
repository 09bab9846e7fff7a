// The CUDA kernels for float logits (see cuda_instances.h).
#include "launchers/cuda_instances.h"

namespace opd_fast {
namespace kernels {
OPD_FAST_CUDA_LAUNCHES(, float)
}  // namespace kernels
}  // namespace opd_fast
