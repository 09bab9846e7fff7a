// Shared pieces of the opd_fast CUDA kernels: element types, 16-byte vector I/O, exp, row
// alignment. Torch-free (raw pointers and CUDA types only).
//
// Element types and their accumulation type (as on the CPU):
//     float -> float, double -> double, __nv_bfloat16 -> float, __half -> float
// A "vector" is 16 bytes: 4 floats, 2 doubles, 8 bf16 / fp16. Vector loads need a 16-byte
// aligned address; row_vector_head() says where in a row that alignment starts.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace opd_fast {
namespace kernels {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------
// exp in the accumulation type. float: exp2 with log2(e) folded in (ex2.approx under
// --use_fast_math); exp(-inf) = 0 and exp(NaN) = NaN in both.
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ float exp_acc(float x) { return exp2f(x * 1.4426950408889634f); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

// ---------------------------------------------------------------------------------------
// Element conversion and 16-byte vector I/O
// ---------------------------------------------------------------------------------------

template <typename scalar_t>
struct Element;

template <>
struct Element<float> {
  using acc_t = float;
  static constexpr int kVec = 4;
  static __device__ __forceinline__ float to_acc(float x) { return x; }
  static __device__ __forceinline__ float from_acc(float x) { return x; }
  static __device__ __forceinline__ void load_vec(const float* src, float (&out)[kVec]) {
    const float4 v = *reinterpret_cast<const float4*>(src);
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
  }
  static __device__ __forceinline__ void store_vec(float* dst, const float (&in)[kVec]) {
    *reinterpret_cast<float4*>(dst) = make_float4(in[0], in[1], in[2], in[3]);
  }
};

template <>
struct Element<double> {
  using acc_t = double;
  static constexpr int kVec = 2;
  static __device__ __forceinline__ double to_acc(double x) { return x; }
  static __device__ __forceinline__ double from_acc(double x) { return x; }
  static __device__ __forceinline__ void load_vec(const double* src, double (&out)[kVec]) {
    const double2 v = *reinterpret_cast<const double2*>(src);
    out[0] = v.x;
    out[1] = v.y;
  }
  static __device__ __forceinline__ void store_vec(double* dst, const double (&in)[kVec]) {
    *reinterpret_cast<double2*>(dst) = make_double2(in[0], in[1]);
  }
};

// bf16 <-> float: the float has the bf16 bits in its upper half (exact); stores round to
// nearest even (NaN stays NaN).
template <>
struct Element<__nv_bfloat16> {
  using acc_t = float;
  static constexpr int kVec = 8;
  static __device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float x) {
    return __float2bfloat16_rn(x);
  }
  static __device__ __forceinline__ void load_vec(const __nv_bfloat16* src, float (&out)[kVec]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(src);
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // little endian: element 2i is the low half of word i
      out[2 * i] = __uint_as_float(words[i] << 16);
      out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
  }
  static __device__ __forceinline__ void store_vec(__nv_bfloat16* dst, const float (&in)[kVec]) {
    uint32_t words[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(in[2 * i]));
      const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(in[2 * i + 1]));
      words[i] = lo | (hi << 16);
    }
    *reinterpret_cast<uint4*>(dst) = make_uint4(words[0], words[1], words[2], words[3]);
  }
};

template <>
struct Element<__half> {
  using acc_t = float;
  static constexpr int kVec = 8;
  static __device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_acc(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ void load_vec(const __half* src, float (&out)[kVec]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(src);
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(words[i] & 0xffffu)));
      out[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(words[i] >> 16)));
    }
  }
  static __device__ __forceinline__ void store_vec(__half* dst, const float (&in)[kVec]) {
    uint32_t words[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t lo = __half_as_ushort(__float2half_rn(in[2 * i]));
      const uint32_t hi = __half_as_ushort(__float2half_rn(in[2 * i + 1]));
      words[i] = lo | (hi << 16);
    }
    *reinterpret_cast<uint4*>(dst) = make_uint4(words[0], words[1], words[2], words[3]);
  }
};

// ---------------------------------------------------------------------------------------
// Row alignment: elements before the first 16-byte aligned one (-1 if the pointer is not
// even element aligned, then only scalar access is used).
// ---------------------------------------------------------------------------------------

template <typename scalar_t>
__device__ __forceinline__ int64_t vector_head(const scalar_t* row) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(row);
  if (address % sizeof(scalar_t) != 0) return -1;
  return int64_t(((16 - address % 16) % 16) / sizeof(scalar_t));
}

// A row of `vocab` elements is processed as [0, head) scalar, [head, head + num_vec * kVec)
// as 16-byte vectors, [head + num_vec * kVec, vocab) scalar. All rows passed in (student,
// teacher, gradient) must share the same head for the vector part to be used; otherwise the
// whole row is scalar (head = vocab, num_vec = 0).
struct RowSplit {
  int64_t head;
  int64_t num_vec;
  int64_t body_end;
};

template <int kVec>
__device__ __forceinline__ RowSplit split_row(int64_t vocab, int64_t head_a, int64_t head_b,
                                              int64_t head_c) {
  RowSplit split;
  const bool vectorisable = head_a >= 0 && head_a == head_b && head_a == head_c;
  split.head = vectorisable ? (head_a < vocab ? head_a : vocab) : vocab;
  split.num_vec = (vocab - split.head) / kVec;
  split.body_end = split.head + split.num_vec * kVec;
  return split;
}

}  // namespace kernels
}  // namespace opd_fast
