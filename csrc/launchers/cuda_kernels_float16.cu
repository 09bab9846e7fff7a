// The CUDA kernels for float16 logits (see cuda_instances.h).
#include "launchers/cuda_instances.h"

namespace opd_fast {
namespace kernels {
OPD_FAST_CUDA_LAUNCHES(, __half)
}  // namespace kernels
}  // namespace opd_fast
