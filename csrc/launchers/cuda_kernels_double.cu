// The CUDA kernels for double logits (see cuda_instances.h).
#include "launchers/cuda_instances.h"

namespace opd_fast {
namespace kernels {
OPD_FAST_CUDA_LAUNCHES(, double)
}  // namespace kernels
}  // namespace opd_fast
