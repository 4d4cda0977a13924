// Launch and vector-load helpers shared by the CUDA kernels (host and device, CUDA only).
#pragma once

#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>

namespace dropreg {
namespace cuda {

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
