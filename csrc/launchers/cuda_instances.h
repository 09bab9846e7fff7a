// The CUDA kernels' launch functions (kernels::launch of csrc/kernels/cuda), instantiated one
// logits dtype per translation unit (cuda_kernels_<dtype>.cu) and declared extern in cuda.cu:
// the kernels compile in parallel and without ATen's headers, and cuda.cu compiles none of
// them. (One .cu holding everything was the longest step of the build: about 65 s for sm_90
// alone, the critical path of a 16-core build on a lent GPU machine.)
#pragma once

#include <cuda_runtime.h>

#include "kernels/cuda/opd_backward.cuh"
#include "kernels/cuda/opd_forward.cuh"
#include "kernels/cuda/opd_sparse.cuh"

// OPD_FAST_CUDA_LAUNCHES(extern, T) declares the four launchers for logits of type T,
// OPD_FAST_CUDA_LAUNCHES(, T) instantiates them. Inside namespace opd_fast::kernels.
#define OPD_FAST_CUDA_LAUNCHES(EXTERN, T)                                        \
  EXTERN template cudaError_t launch<T>(const ForwardParams<T>&, cudaStream_t);  \
  EXTERN template cudaError_t launch<T>(const BackwardParams<T>&, cudaStream_t); \
  EXTERN template cudaError_t launch<T>(const TopkParams<T>&, cudaStream_t);     \
  EXTERN template cudaError_t launch<T>(const SparseForwardParams<T>&, cudaStream_t);
