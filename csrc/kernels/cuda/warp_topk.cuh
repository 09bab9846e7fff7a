// Exact top-k of a streamed row on the GPU: a running top-k per warp in registers, then a
// block-wide bitonic sort of the per-warp lists in shared memory. Torch-free.
//
// Order (same as the CPU kernels and torch.topk + the reference's tie rule): by value
// descending, ties -> lower id first; NaN never enters; -inf entries enter only when fewer
// than k other entries exist (they rank below every finite value, lower ids first).
//
// Keys. A (value, id) pair is packed so that ONE comparison orders by value, then lower id:
//     float values : uint64  (ordered(value bits) << 32) | ~id
//     double values: struct  {ordered(value bits) : uint64, ~id : uint32}, compared
//                    lexicographically (a 64-bit value needs more than one word)
// where ordered() maps IEEE bits to an unsigned integer with the same order (flip all bits of
// negatives, set the sign bit of positives), -0.0 first canonicalised to +0.0 (equal values
// tie on id). ids must be < 2^31, so ~id >= 2^31 and the empty key (ordered(-inf), ~id = 0)
// ranks below every real entry, -inf included.
//
// WarpTopk. A warp keeps the best 32 * kSlots keys it has seen, sorted descending across lanes
// and slots: rank r lives in lane r % 32 of slot r / 32 (registers only). Only ranks < k
// matter; `threshold` is the key at rank k - 1 (the empty key until k entries were seen).
// Each lane offers its elements: a cheap float compare against the threshold value filters
// them, and the survivors are inserted one at a time by the whole warp (ballot + popc to find
// the position, one lane-rotating shuffle per slot to shift the tail down). For random logits
// about k * ln(n / k) of a warp's n elements survive; an ascending row makes every element
// survive, which is slow but still exact.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernels/cuda/common.cuh"

namespace opd_fast {
namespace kernels {

// ---------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------

template <typename acc_t>
struct TopkKey;

template <>
struct TopkKey<float> {
  using type = unsigned long long;

  static __device__ __forceinline__ type empty() { return 0x007fffff00000000ull; }

  static __device__ __forceinline__ type make(float value, uint32_t id) {
    uint32_t bits = __float_as_uint(value);
    if (bits == 0x80000000u) bits = 0u;  // -0.0 -> +0.0
    const uint32_t ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    return (type(ordered) << 32) | type(~id);
  }
  static __device__ __forceinline__ bool greater(type a, type b) { return a > b; }
  static __device__ __forceinline__ float value(type key) {
    const uint32_t ordered = uint32_t(key >> 32);
    const uint32_t bits = (ordered & 0x80000000u) ? (ordered & 0x7fffffffu) : ~ordered;
    return __uint_as_float(bits);
  }
  // -1 for the empty key.
  static __device__ __forceinline__ int64_t index(type key) {
    return key == empty() ? int64_t(-1) : int64_t(~uint32_t(key & 0xffffffffull));
  }
  static __device__ __forceinline__ type shfl(type key, int src_lane) {
    return __shfl_sync(kFullMask, key, src_lane);
  }
  // take_b ? b : a with bit masks (a select chain on register arrays must not become an
  // indexed local-memory load).
  static __device__ __forceinline__ type blend(type a, type b, bool take_b) {
    const type mask = type(0) - type(take_b);
    return (a & ~mask) | (b & mask);
  }
};

struct DoubleKey {
  unsigned long long ordered;
  unsigned int inverted_id;
};

template <>
struct TopkKey<double> {
  using type = DoubleKey;

  static __device__ __forceinline__ type empty() {
    DoubleKey key;
    key.ordered = 0x000fffffffffffffull;  // ordered(-inf)
    key.inverted_id = 0u;
    return key;
  }
  static __device__ __forceinline__ type make(double value, uint32_t id) {
    unsigned long long bits = static_cast<unsigned long long>(__double_as_longlong(value));
    if (bits == 0x8000000000000000ull) bits = 0ull;  // -0.0 -> +0.0
    DoubleKey key;
    key.ordered = (bits & 0x8000000000000000ull) ? ~bits : (bits | 0x8000000000000000ull);
    key.inverted_id = ~id;
    return key;
  }
  static __device__ __forceinline__ bool greater(const type& a, const type& b) {
    return a.ordered > b.ordered || (a.ordered == b.ordered && a.inverted_id > b.inverted_id);
  }
  static __device__ __forceinline__ double value(const type& key) {
    const unsigned long long bits = (key.ordered & 0x8000000000000000ull)
                                        ? (key.ordered & 0x7fffffffffffffffull)
                                        : ~key.ordered;
    return __longlong_as_double(static_cast<long long>(bits));
  }
  static __device__ __forceinline__ int64_t index(const type& key) {
    const DoubleKey e = empty();
    return key.ordered == e.ordered && key.inverted_id == e.inverted_id
               ? int64_t(-1)
               : int64_t(~key.inverted_id);
  }
  static __device__ __forceinline__ type shfl(const type& key, int src_lane) {
    DoubleKey out;
    out.ordered = __shfl_sync(kFullMask, key.ordered, src_lane);
    out.inverted_id = __shfl_sync(kFullMask, key.inverted_id, src_lane);
    return out;
  }
  static __device__ __forceinline__ type blend(const type& a, const type& b, bool take_b) {
    const unsigned long long mask = 0ull - static_cast<unsigned long long>(take_b);
    const unsigned int mask32 = static_cast<unsigned int>(mask);
    DoubleKey out;
    out.ordered = (a.ordered & ~mask) | (b.ordered & mask);
    out.inverted_id = (a.inverted_id & ~mask32) | (b.inverted_id & mask32);
    return out;
  }
};

// r = a[i] for a compile-time sized register array and a run-time i (no local memory).
template <int N, typename T>
__device__ __forceinline__ T pick(const T (&a)[N], int i) {
  T r = a[0];
#pragma unroll
  for (int j = 1; j < N; ++j) {
    if (j == i) r = a[j];
  }
  return r;
}

// ---------------------------------------------------------------------------------------
// Running top-k of one warp. Every member function must be called by all 32 lanes with
// warp-uniform arguments except where noted.
// ---------------------------------------------------------------------------------------

template <typename acc_t, int kSlots>
struct WarpTopk {
  using Ops = TopkKey<acc_t>;
  using Key = typename Ops::type;

  Key slot[kSlots];       // rank s * 32 + lane, descending over all 32 * kSlots ranks
  Key threshold;          // key at rank k - 1 (warp-uniform)
  acc_t threshold_value;  // its value: elements below it can never enter

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int s = 0; s < kSlots; ++s) slot[s] = Ops::empty();
    threshold = Ops::empty();
    threshold_value = Ops::value(threshold);  // -inf
  }

  __device__ __forceinline__ void refresh_threshold(int k) {
    const int kth = k - 1;
    Key at_slot = slot[0];
#pragma unroll
    for (int s = 1; s < kSlots; ++s) at_slot = Ops::blend(at_slot, slot[s], (kth >> 5) == s);
    threshold = Ops::shfl(at_slot, kth & 31);
    threshold_value = Ops::value(threshold);
  }

  // Inserts key x (warp-uniform, greater than the threshold) keeping the order.
  __device__ __forceinline__ void insert(const Key& x, int k, int lane) {
    int pos = 0;  // number of held keys greater than x
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      pos += __popc(__ballot_sync(kFullMask, Ops::greater(slot[s], x)));
    }
    // rotated[s] in lane l holds slot[s] of lane l - 1 (lane 0: of lane 31).
    Key rotated[kSlots];
#pragma unroll
    for (int s = 0; s < kSlots; ++s) rotated[s] = Ops::shfl(slot[s], (lane + 31) & 31);
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      // The key one rank above this one: lane - 1 of this slot, or lane 31 of the slot before.
      Key shifted = rotated[s];
      if (lane == 0) shifted = s == 0 ? Ops::empty() : rotated[s == 0 ? 0 : s - 1];
      const int rank = s * kWarpSize + lane;
      if (rank == pos) {
        slot[s] = x;
      } else if (rank > pos) {
        slot[s] = shifted;
      }
    }
    refresh_threshold(k);
  }

  // Offers values[0, N) with ids first_id + i; `valid` may differ between lanes (invalid
  // lanes offer nothing). Called by all lanes.
  template <int N>
  __device__ __forceinline__ void offer(const acc_t (&values)[N], int64_t first_id, bool valid,
                                        int k, int lane) {
    static_assert(N <= 32, "one pending bit per element");
    unsigned pending = 0;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (valid && values[i] >= threshold_value) pending |= 1u << i;  // false for NaN
    }
    while (__any_sync(kFullMask, pending != 0)) {
      // Each lane offers its lowest pending element; the warp inserts them one by one.
      Key mine = Ops::empty();
      const bool has = pending != 0;
      if (has) {
        const int i = __ffs(static_cast<int>(pending)) - 1;
        pending &= pending - 1;
        mine = Ops::make(pick(values, i), static_cast<uint32_t>(first_id + i));
      }
      unsigned lanes = __ballot_sync(kFullMask, has);
      while (lanes != 0) {
        const int src = __ffs(static_cast<int>(lanes)) - 1;
        lanes &= lanes - 1;
        const Key x = Ops::shfl(mine, src);
        if (Ops::greater(x, threshold)) insert(x, k, lane);
      }
      // Drop what the raised threshold now excludes.
#pragma unroll
      for (int i = 0; i < N; ++i) {
        if (((pending >> i) & 1u) && !(values[i] >= threshold_value)) pending &= ~(1u << i);
      }
    }
  }

  // Writes ranks [0, kpad) to out: the held key for ranks < k, the empty key for the rest.
  __device__ __forceinline__ void store(Key* out, int k, int kpad, int lane) const {
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      const int rank = s * kWarpSize + lane;
      if (rank < kpad) out[rank] = rank < k ? slot[s] : Ops::empty();
    }
  }
};

// ---------------------------------------------------------------------------------------
// Block-wide bitonic sort, descending, of `segments` independent arrays of `size` keys each
// (size a power of two), stored back to back in shared memory. All threads of the block must
// call it; it ends with __syncthreads().
// ---------------------------------------------------------------------------------------

template <typename acc_t>
__device__ void block_sort_descending(typename TopkKey<acc_t>::type* keys, int size, int segments) {
  using Ops = TopkKey<acc_t>;
  using Key = typename Ops::type;
  const int half = size >> 1;
  const int pairs = half * segments;
  for (int run = 2; run <= size; run <<= 1) {
    for (int stride = run >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < pairs; t += blockDim.x) {
        const int segment = t / half;
        const int j = t - segment * half;
        const int lo = ((j & ~(stride - 1)) << 1) | (j & (stride - 1));
        const int hi = lo + stride;
        Key* a = keys + segment * size;
        const Key x = a[lo];
        const Key y = a[hi];
        // Runs with (lo & run) == 0 go descending, the others ascending; the last pass
        // (run == size) makes the whole segment descending.
        const bool descending = (lo & run) == 0;
        if (descending ? Ops::greater(y, x) : Ops::greater(x, y)) {
          a[lo] = y;
          a[hi] = x;
        }
      }
      __syncthreads();
    }
  }
}

// Calls body(slots, kpad) for k: slots = std::integral_constant<int, kSlots> with kSlots the
// WarpTopk slots that hold k ranks (1, 2 or 4), kpad = k rounded up to a power of two. Host
// code: it picks the kernel instance to launch.
template <typename Body>
inline auto with_topk_slots(int k, Body&& body) {
  int kpad = 1;
  while (kpad < k) kpad <<= 1;
  if (k <= 32) return body(std::integral_constant<int, 1>{}, kpad);
  if (k <= 64) return body(std::integral_constant<int, 2>{}, kpad);
  return body(std::integral_constant<int, 4>{}, kpad);
}

}  // namespace kernels
}  // namespace opd_fast
