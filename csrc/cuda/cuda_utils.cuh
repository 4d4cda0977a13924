// Launch, warp and vector load/store helpers shared by the CUDA kernels (host and device, CUDA only).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

namespace dropreg {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;  // every lane of a warp takes part in a shuffle
constexpr int kWarpSize = 32;

// Elements are handled in chunks of whole Philox calls (kPerCall elements each: 4 at the u32
// density of the Gumbel stream, 8 at the u16 density of the mask) and at least one 16-byte vector:
// f32 Gumbel chunks are 4 elements, bf16 ones 8 (2 calls); mask chunks are 8 elements (1 call) for
// every dtype, loaded as 16-byte vectors (kVec elements each: 2 for f64, 4 for f32, 8 for 2-byte).
template <typename scalar_t, int kPerCall = 4>
struct ChunkShape {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));
  static constexpr int kElems = kVec > kPerCall ? kVec : kPerCall;
  static constexpr int kGroups = kElems / kPerCall;
  static constexpr uintptr_t kAlign = sizeof(scalar_t) * kVec;
};

template <typename scalar_t, int kElems>
struct alignas(sizeof(scalar_t) * kElems) AlignedVec {
  scalar_t v[kElems];
};

// 16-byte vectors of a chunk of kElems (the whole chunk when it is smaller).
template <typename scalar_t, int kElems>
constexpr int vec_elems() {
  return 16 / static_cast<int>(sizeof(scalar_t)) < kElems ? 16 / static_cast<int>(sizeof(scalar_t)) : kElems;
}

// A missing (null) optional input never blocks the vector path.
inline bool is_aligned(const void* p, uintptr_t align) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % align == 0;
}

// Blocks of `kernel` with `threads` threads and `smem` bytes of dynamic shared memory that fit on
// the current device at once, from the occupancy calculator (registers and shared memory
// included), computed once per kernel, block size, shared memory size and device. Grids are
// capped at one resident wave and loop (grid-stride) beyond it, so no wave is left with a short
// tail.
template <typename Kernel>
int resident_blocks(Kernel kernel, int threads, size_t smem = 0) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, size_t, int>, int> cache;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), threads, smem, device);
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it == cache.end()) {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
    it = cache.emplace(key, std::max(1, per_sm) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount).first;
  }
  return it->second;
}

template <typename Kernel>
int grid_size(Kernel kernel, int64_t work_blocks, int threads, size_t smem = 0) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(work_blocks, resident_blocks(kernel, threads, smem))));
}

// Dynamic shared memory a block of `kernel` may use on the current device: the device's opt-in
// maximum less the kernel's static shared memory. The first call per kernel and device raises the
// kernel's limit to it (launches above 48 KB fail without that).
template <typename Kernel>
size_t max_dynamic_smem(Kernel kernel) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> cache;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it == cache.end()) {
    cudaFuncAttributes attr;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    const size_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
    const size_t bytes = optin > attr.sharedSizeBytes ? optin - attr.sharedSizeBytes : 0;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    it = cache.emplace(key, bytes).first;
  }
  return it->second;
}

// a * b rounded on its own, never contracted with a later add into an FMA: a running sum rescaled
// by it rounds as written, whatever code the compiler schedules around it.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

}  // namespace cuda
}  // namespace dropreg
