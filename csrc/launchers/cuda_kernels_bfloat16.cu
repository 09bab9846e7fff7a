// The CUDA kernels for bfloat16 logits (see cuda_instances.h).
#include "launchers/cuda_instances.h"

namespace opd_fast {
namespace kernels {
OPD_FAST_CUDA_LAUNCHES(, __nv_bfloat16)
}  // namespace kernels
}  // namespace opd_fast
