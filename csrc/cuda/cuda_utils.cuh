// Launch, warp and vector load/store helpers shared by the CUDA kernels (host and device, CUDA only).
#pragma once

#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>

namespace dropreg {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;  // every lane of a warp takes part in a shuffle
constexpr int kWarpSize = 32;

// Elements are handled in chunks of one 16-byte vector (32 bytes for double), made of whole Philox
// calls: kGroups groups of 4 elements (8 halves = 2 groups), at least one group.
template <typename scalar_t>
struct ChunkShape {
  static constexpr int kGroups = sizeof(scalar_t) >= 4 ? 1 : 16 / (4 * sizeof(scalar_t));
  static constexpr int kElems = 4 * kGroups;
  static constexpr uintptr_t kAlign = sizeof(scalar_t) * kElems;
};

template <typename scalar_t, int kElems>
struct alignas(sizeof(scalar_t) * kElems) AlignedVec {
  scalar_t v[kElems];
};

// Loads the chunk of flat indices [base, base + kElems) restricted to the row [begin, end) into
// x (acc_t); in_row marks the elements that belong to the row (others read as 0, never used).
template <typename scalar_t, typename acc_t, int kElems, bool kAligned>
__device__ __forceinline__ void load_row_chunk(const scalar_t* __restrict__ src, int64_t base,
                                               int64_t begin, int64_t end, acc_t (&x)[kElems],
                                               bool (&in_row)[kElems]) {
  using Vec = AlignedVec<scalar_t, kElems>;
  if (kAligned && base >= begin && base + kElems <= end) {
    const Vec v = *reinterpret_cast<const Vec*>(src + base);
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      x[e] = static_cast<acc_t>(v.v[e]);
      in_row[e] = true;
    }
  } else {
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      const int64_t i = base + e;
      in_row[e] = i >= begin && i < end;
      x[e] = in_row[e] ? static_cast<acc_t>(src[i]) : acc_t(0);
    }
  }
}

// Stores the in-row elements of a chunk (one vector store when the chunk is the row's).
template <typename scalar_t, typename acc_t, int kElems, bool kAligned>
__device__ __forceinline__ void store_row_chunk(scalar_t* __restrict__ dst, int64_t base,
                                                int64_t begin, int64_t end,
                                                const acc_t (&y)[kElems]) {
  using Vec = AlignedVec<scalar_t, kElems>;
  if (kAligned && base >= begin && base + kElems <= end) {
    Vec v;
#pragma unroll
    for (int e = 0; e < kElems; ++e) v.v[e] = static_cast<scalar_t>(y[e]);
    *reinterpret_cast<Vec*>(dst + base) = v;
  } else {
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      const int64_t i = base + e;
      if (i >= begin && i < end) dst[i] = static_cast<scalar_t>(y[e]);
    }
  }
}

// x[e] = src[base + e] in acc_t for the chunk's elements below n (0 beyond n, never used).
template <typename scalar_t, typename acc_t, int kElems, bool kAligned>
__device__ __forceinline__ void load_chunk(const scalar_t* __restrict__ src, int64_t base,
                                           int64_t n, acc_t (&x)[kElems]) {
  bool in_range[kElems];
  load_row_chunk<scalar_t, acc_t, kElems, kAligned>(src, base, 0, n, x, in_range);
}

// dst[base + e] = y[e] for the chunk's elements below n.
template <typename scalar_t, typename acc_t, int kElems, bool kAligned>
__device__ __forceinline__ void store_chunk(scalar_t* __restrict__ dst, int64_t base, int64_t n,
                                            const acc_t (&y)[kElems]) {
  store_row_chunk<scalar_t, acc_t, kElems, kAligned>(dst, base, 0, n, y);
}

// A missing (null) optional input never blocks the vector path.
inline bool is_aligned(const void* p, uintptr_t align) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % align == 0;
}

// Blocks of `threads` that fit on the device at once: grids are capped at one resident wave and
// loop (grid-stride) beyond it.
inline int64_t resident_blocks(int threads) {
  const auto* props = at::cuda::getCurrentDeviceProperties();
  return static_cast<int64_t>(props->multiProcessorCount) *
         std::max(1, props->maxThreadsPerMultiProcessor / threads);
}

inline int grid_size(int64_t work_blocks, int threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min(work_blocks, resident_blocks(threads))));
}

}  // namespace cuda
}  // namespace dropreg
