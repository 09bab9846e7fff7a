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
// exp in the accumulation type, in two forms (docs/math.md, Device arithmetic). The build has
// no --use_fast_math, so exp, log and division everywhere else are CUDA's accurate ones.
//   exp_precise: expf (<= 2 ulp) / exp. Every value that scales a whole running sum (the
//     rescaling of the online softmax state, the merges of partial states) and, through
//     row_loss.h's exp and log, every loss, metric and gradient coefficient.
//   exp_stream: one per element of the streaming passes only (the forward's online sums, the
//     backward's p_j). float: ex2.approx.ftz.f32 of x * log2(e), within 2 ulp of 2^y (CUDA's
//     exp2f is this instruction) after the product's rounding, a relative error of at most
//     |x| 2^-24 (so |e^x - exp_stream(x)| <= e^x (2^-22 + |x| 2^-24)); results below
//     2^-126 are 0. double: exp.
// Both: exp(-inf) = 0 and exp(NaN) = NaN. The emulator (tools/cuda_emulator) provides its own
// ex2_approx_ftz with the documented error (OPD_FAST_EMULATED_EX2).
// ---------------------------------------------------------------------------------------

#ifndef OPD_FAST_EMULATED_EX2
__device__ __forceinline__ float ex2_approx_ftz(float y) {
  float result;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(result) : "f"(y));  // opd-fast-math: exp_stream
  return result;
}
#endif

__device__ __forceinline__ float exp_stream(float x) {
  return ex2_approx_ftz(x * 1.4426950408889634f);
}
__device__ __forceinline__ double exp_stream(double x) { return exp(x); }
__device__ __forceinline__ float exp_precise(float x) { return expf(x); }
__device__ __forceinline__ double exp_precise(double x) { return exp(x); }

// ---------------------------------------------------------------------------------------
// Element conversion and 16-byte vector I/O
// ---------------------------------------------------------------------------------------

template <typename scalar_t>
struct Element;

// float and double: their own accumulation type, moved as float4 / double2.
__device__ __forceinline__ void unpack(const float4& v, float (&out)[4]) {
  out[0] = v.x;
  out[1] = v.y;
  out[2] = v.z;
  out[3] = v.w;
}
__device__ __forceinline__ float4 pack(const float (&in)[4]) {
  return make_float4(in[0], in[1], in[2], in[3]);
}
__device__ __forceinline__ void unpack(const double2& v, double (&out)[2]) {
  out[0] = v.x;
  out[1] = v.y;
}
__device__ __forceinline__ double2 pack(const double (&in)[2]) {
  return make_double2(in[0], in[1]);
}

template <typename T, typename Vector>
struct FullPrecisionElement {
  using acc_t = T;
  static constexpr int kVec = sizeof(Vector) / sizeof(T);
  static __device__ __forceinline__ T to_acc(T x) { return x; }
  static __device__ __forceinline__ T from_acc(T x) { return x; }
  static __device__ __forceinline__ void load_vec(const T* src, T (&out)[kVec]) {
    unpack(*reinterpret_cast<const Vector*>(src), out);
  }
  static __device__ __forceinline__ void store_vec(T* dst, const T (&in)[kVec]) {
    *reinterpret_cast<Vector*>(dst) = pack(in);
  }
};

template <>
struct Element<float> : FullPrecisionElement<float, float4> {};
template <>
struct Element<double> : FullPrecisionElement<double, double2> {};

// bf16 and fp16: float accumulation, 8 per 16 bytes, two per 32-bit word (little endian:
// element 2i is the low half of word i). Bits converts one type: to_acc / from_acc, low(word)
// and high(word) to float, and bits(float) to the rounded 16-bit pattern.
template <typename T, typename Bits>
struct HalfPrecisionElement {
  using acc_t = float;
  static constexpr int kVec = 8;
  static __device__ __forceinline__ float to_acc(T x) { return Bits::to_acc(x); }
  static __device__ __forceinline__ T from_acc(float x) { return Bits::from_acc(x); }
  static __device__ __forceinline__ void load_vec(const T* src, float (&out)[kVec]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(src);
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = Bits::low(words[i]);
      out[2 * i + 1] = Bits::high(words[i]);
    }
  }
  static __device__ __forceinline__ void store_vec(T* dst, const float (&in)[kVec]) {
    uint32_t words[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      words[i] = Bits::bits(in[2 * i]) | (Bits::bits(in[2 * i + 1]) << 16);
    }
    *reinterpret_cast<uint4*>(dst) = make_uint4(words[0], words[1], words[2], words[3]);
  }
};

// bf16 <-> float: the float has the bf16 bits in its upper half (exact); stores round to
// nearest even (NaN stays NaN).
struct Bf16Bits {
  static __device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float x) {
    return __float2bfloat16_rn(x);
  }
  static __device__ __forceinline__ float low(uint32_t word) { return __uint_as_float(word << 16); }
  static __device__ __forceinline__ float high(uint32_t word) {
    return __uint_as_float(word & 0xffff0000u);
  }
  static __device__ __forceinline__ uint32_t bits(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
};

struct Fp16Bits {
  static __device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_acc(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ float low(uint32_t word) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(word & 0xffffu)));
  }
  static __device__ __forceinline__ float high(uint32_t word) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(word >> 16)));
  }
  static __device__ __forceinline__ uint32_t bits(float x) {
    return __half_as_ushort(__float2half_rn(x));
  }
};

template <>
struct Element<__nv_bfloat16> : HalfPrecisionElement<__nv_bfloat16, Bf16Bits> {};
template <>
struct Element<__half> : HalfPrecisionElement<__half, Fp16Bits> {};

// The row a one-CTA-per-row kernel's block owns, and where the calling thread sits in it.
struct RowThread {
  int64_t row;
  int tid;
  int lane;
  int warp;
};

__device__ __forceinline__ RowThread row_thread() {
  const int tid = threadIdx.x;
  return RowThread{int64_t(blockIdx.x), tid, tid % kWarpSize, tid / kWarpSize};
}

// Dynamic shared memory of the calling kernel (16-byte aligned), as an array of T.
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char dynamic_smem_bytes[];
  return reinterpret_cast<T*>(dynamic_smem_bytes);
}

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
