// Host emulation of the CUDA features the opd_fast kernels use: every CUDA thread is a
// std::thread; __syncthreads is a block barrier; warp intrinsics exchange through a per-warp
// barrier (so a divergent warp op deadlocks instead of passing silently).
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <barrier>
#include <condition_variable>
#include <functional>
#include <mutex>
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

// ---------------------------------------------------------------------------------------
// Device arithmetic (docs/math.md, Device arithmetic). OPD_EMU_MATH picks, at run time, how the
// functions whose device results differ from glibc's are emulated:
//   exact  correctly rounded (the default, what the cases against the CPU op use);
//   high   each result the documented maximum error above the exact value;
//   low    the same below;
//   hash   up or down by a hash of the argument's bits: a fixed error per argument, as the
//          hardware's, uncorrelated between arguments.
// The documented maxima: ex2.approx.ftz.f32 (common.cuh's exp_stream) 2 ulp, with results
// below 2^-126 flushed to 0 (CUDA's exp2f, this one instruction, is documented at 2 ulp);
// expf 2 ulp and logf 1 ulp (CUDA Math API). Double precision and division are IEEE here as on
// the device build (no --use_fast_math). OPD_EMU_MATH=legacy adds the approximations that
// --use_fast_math made (__logf: 2^-21.41 absolute on [0.5, 2], else 3 ulp; __expf:
// 2 + floor(1.173 |x|) ulp), for a negative control; it cannot reach division.
// ---------------------------------------------------------------------------------------
#define OPD_FAST_EMULATED_EX2
#include <cstdlib>
#include <string>

enum class EmuMath { kExact, kHigh, kLow, kHash, kLegacy };
inline EmuMath emu_math_mode() {
  static const EmuMath mode = [] {
    const char* env = std::getenv("OPD_EMU_MATH");
    const std::string name = env ? env : "exact";
    if (name == "high") return EmuMath::kHigh;
    if (name == "low") return EmuMath::kLow;
    if (name == "hash") return EmuMath::kHash;
    if (name == "legacy") return EmuMath::kLegacy;
    return EmuMath::kExact;
  }();
  return mode;
}

// +1 or -1 for an error of the mode's sign at argument `x` (salted per function).
inline int emu_error_sign(float x, unsigned salt) {
  switch (emu_math_mode()) {
    case EmuMath::kLow: return -1;
    case EmuMath::kHash:
    case EmuMath::kLegacy: {
      unsigned h;
      std::memcpy(&h, &x, 4);
      h ^= salt;
      h *= 0x9E3779B1u;
      h ^= h >> 16;
      h *= 0x85EBCA6Bu;
      h ^= h >> 13;
      return (h & 1u) ? 1 : -1;
    }
    default: return 1;
  }
}

// The float nearest to `exact`, then moved by `ulps` units in the last place (sign by mode).
inline float emu_perturbed(double exact, float argument, double ulps, unsigned salt) {
  const float nearest = float(exact);
  if (emu_math_mode() == EmuMath::kExact || !std::isfinite(nearest) || nearest == 0.0f) {
    return nearest;
  }
  const float ulp = std::nextafter(std::fabs(nearest), INFINITY) - std::fabs(nearest);
  return float(double(nearest) + emu_error_sign(argument, salt) * ulps * double(ulp));
}

// ex2.approx.ftz.f32: subnormal arguments read as 0, results below 2^-126 are 0.
inline float ex2_approx_ftz(float y) {
  if (std::fpclassify(y) == FP_SUBNORMAL) y = 0.0f;
  const double exact = std::exp2(double(y));
  if (exact < 0x1p-126) return y != y ? y : 0.0f;
  return emu_perturbed(exact, y, 2.0, 0x51u);
}

namespace opd_fast {
// What unqualified exp / expf / log calls in the kernels' namespace find: CUDA's accurate
// float functions at their documented error, double ones (1 ulp on the device) exact.
inline float expf(float x) {
  if (emu_math_mode() == EmuMath::kLegacy) {  // __expf
    return emu_perturbed(std::exp(double(x)), x, 2.0 + std::floor(std::fabs(1.173 * x)), 0xe1u);
  }
  return emu_perturbed(std::exp(double(x)), x, 2.0, 0xe2u);
}
inline float exp(float x) { return opd_fast::expf(x); }
inline double exp(double x) { return std::exp(x); }
inline float log(float x) {
  if (emu_math_mode() == EmuMath::kLegacy) {  // __logf
    if (x >= 0.5f && x <= 2.0f) {
      return float(std::log(double(x)) + emu_error_sign(x, 0x1fu) * std::pow(2.0, -21.41));
    }
    return emu_perturbed(std::log(double(x)), x, 3.0, 0x1eu);
  }
  return emu_perturbed(std::log(double(x)), x, 1.0, 0x1du);
}
inline double log(double x) { return std::log(x); }
}  // namespace opd_fast

// The 256 CUDA threads of a block are one persistent pool of std::threads, reused for every
// block (creating 256 threads per block made thread creation most of a check's time).
struct EmuPool {
  std::vector<std::thread> workers;
  std::mutex mutex;
  std::condition_variable start, done;
  std::function<void()> body;
  unsigned block = 0, generation = 0;
  int running = 0;
  bool stop = false;

  EmuPool() {
    for (unsigned t = 0; t < 256; ++t) {
      workers.emplace_back([this, t] {
        emu_threadIdx = {t, 0, 0};
        emu_lane = int(t % 32);
        emu_warp = int(t / 32);
        unsigned seen = 0;
        std::unique_lock<std::mutex> lock(mutex);
        for (;;) {
          start.wait(lock, [&] { return stop || generation != seen; });
          if (stop) return;
          seen = generation;
          emu_blockIdx = {block, 0, 0};
          const std::function<void()> run = body;
          lock.unlock();
          run();
          lock.lock();
          if (--running == 0) done.notify_one();
        }
      });
    }
  }
  ~EmuPool() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      stop = true;
    }
    start.notify_all();
    for (auto& worker : workers) worker.join();
  }
  void run(unsigned b, std::function<void()> f) {
    std::unique_lock<std::mutex> lock(mutex);
    body = std::move(f);
    block = b;
    running = 256;
    ++generation;
    start.notify_all();
    done.wait(lock, [&] { return running == 0; });
  }
};

template <class F>
void emu_run_block(unsigned block, F body) {
  static EmuPool pool;
  std::barrier<> bar(256);  // fresh barriers per block
  EmuWarp warps[8];
  g_block_bar = &bar;
  g_warps = warps;
  pool.run(block, std::function<void()>(body));
}
