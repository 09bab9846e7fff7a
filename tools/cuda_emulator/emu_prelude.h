// Host emulation of the CUDA features the opd_fast kernels use: every CUDA thread is a
// std::thread; __syncthreads is a block barrier; warp intrinsics exchange through a per-warp
// barrier (so a divergent warp op deadlocks instead of passing silently).
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static
#define __align__(n) alignas(n)

struct EmuDim { unsigned x, y, z; };
inline thread_local EmuDim emu_threadIdx, emu_blockIdx;
inline EmuDim emu_blockDim{256, 1, 1};
#define threadIdx emu_threadIdx
#define blockIdx emu_blockIdx
#define blockDim emu_blockDim

struct EmuWarp {
  std::barrier<> bar{32};
  alignas(16) unsigned char slot[32][16];
};
inline std::barrier<>* g_block_bar = nullptr;
inline EmuWarp* g_warps = nullptr;
alignas(16) inline unsigned char g_dynamic_smem[1 << 16];
inline thread_local int emu_lane, emu_warp;
inline std::atomic<long> g_warp_ops{0};

inline void __syncthreads() { g_block_bar->arrive_and_wait(); }
template <class T>
inline T __shfl_sync(unsigned, T v, int src) {
  EmuWarp& w = g_warps[emu_warp];
  std::memcpy(w.slot[emu_lane], &v, sizeof(T));
  w.bar.arrive_and_wait();
  T r;
  std::memcpy(&r, w.slot[src & 31], sizeof(T));
  w.bar.arrive_and_wait();
  if (emu_lane == 0) g_warp_ops++;
  return r;
}
template <class T>
inline T __shfl_xor_sync(unsigned m, T v, int o) { return __shfl_sync(m, v, emu_lane ^ o); }
inline unsigned __ballot_sync(unsigned, bool pred) {
  EmuWarp& w = g_warps[emu_warp];
  w.slot[emu_lane][0] = pred ? 1 : 0;
  w.bar.arrive_and_wait();
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) r |= unsigned(w.slot[l][0]) << l;
  w.bar.arrive_and_wait();
  return r;
}
inline bool __any_sync(unsigned m, bool p) { return __ballot_sync(m, p) != 0; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline long long __double_as_longlong(double d) { long long u; std::memcpy(&u, &d, 8); return u; }
inline double __longlong_as_double(long long u) { double d; std::memcpy(&d, &u, 8); return d; }
using std::exp; using std::log; using std::fabs;

template <class F>
void emu_run_block(unsigned block, F body) {
  std::barrier<> bar(256);
  EmuWarp warps[8];
  g_block_bar = &bar;
  g_warps = warps;
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < 256; ++t) {
    threads.emplace_back([&, t] {
      emu_threadIdx = {t, 0, 0};
      emu_blockIdx = {block, 0, 0};
      emu_lane = int(t % 32);
      emu_warp = int(t / 32);
      body();
    });
  }
  for (auto& th : threads) th.join();
}
