// Compiles the CPU kernels (entry_points.inc) once per x86 instruction set and picks one at run
// time, so the same build is fast on AVX-512 machines and still runs on any x86-64 (or other)
// CPU.
#include "kernels/cpu/kernels.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace opd_fast::cpu {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define OPD_FAST_MULTI_ISA 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi2")
namespace avx512 {
#include "kernels/cpu/entry_points.inc"
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi2")
namespace avx2 {
#include "kernels/cpu/entry_points.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace baseline {
#include "kernels/cpu/entry_points.inc"
}  // namespace baseline

namespace {

enum class Isa { kAvx512, kAvx2, kBaseline };

Isa detect_isa() {
#ifdef OPD_FAST_MULTI_ISA
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

const Isa kIsa = detect_isa();

}  // namespace

// The kernels of the instruction set chosen at load time; the branch is per call (a range of
// rows), never per element.
template <typename Args>
void run_on_this_cpu(const Args& args, int64_t row_begin, int64_t row_end) {
#ifdef OPD_FAST_MULTI_ISA
  if (kIsa == Isa::kAvx512) return avx512::run_rows(args, row_begin, row_end);
  if (kIsa == Isa::kAvx2) return avx2::run_rows(args, row_begin, row_end);
#endif
  baseline::run_rows(args, row_begin, row_end);
}

void run_rows(const ForwardArgs& args, int64_t row_begin, int64_t row_end) {
  run_on_this_cpu(args, row_begin, row_end);
}
void run_rows(const SparseForwardArgs& args, int64_t row_begin, int64_t row_end) {
  run_on_this_cpu(args, row_begin, row_end);
}
void run_rows(const TopkArgs& args, int64_t row_begin, int64_t row_end) {
  run_on_this_cpu(args, row_begin, row_end);
}
void run_rows(const BackwardArgs& args, int64_t row_begin, int64_t row_end) {
  run_on_this_cpu(args, row_begin, row_end);
}

const char* instruction_set() {
  switch (kIsa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace opd_fast::cpu
