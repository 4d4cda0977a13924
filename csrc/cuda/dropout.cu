// Fused dropout on CUDA: Philox mask + scale in one pass, no mask tensor.
// Bytes per element: read x, write y (2·sizeof(T)), the floor of any out-of-place elementwise op.
// Each thread handles chunks of 16 bytes (4 elements per Philox call, 2 calls for 2-byte types)
// with one aligned vector load and store (cuda_utils.cuh), in a grid-stride loop. (seed, offset) are read from
// device memory, so a launch needs no host sync and is safe to capture in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "checks.h"
#include "cuda_utils.cuh"
#include "dropout.h"
#include "dropout_host.h"
#include "static_switch.h"

namespace dropreg {
namespace {

constexpr int kThreads = 256;

using cuda::ChunkShape;
using cuda::load_chunk;
using cuda::store_chunk;

// kGroups Philox calls (4·kGroups elements) per chunk; kAligned: x and y are aligned to a chunk.
template <typename scalar_t, typename acc_t, int kGroups, bool kAligned>
__global__ void __launch_bounds__(kThreads)
    dropout_kernel(const scalar_t* x, scalar_t* y, int64_t n, uint64_t threshold, acc_t scale,
                   const int64_t* __restrict__ rng) {
  constexpr int kElems = 4 * kGroups;
  const uint64_t seed = static_cast<uint64_t>(rng[0]);
  const uint64_t offset = static_cast<uint64_t>(rng[1]);
  const int64_t chunks = (n + kElems - 1) / kElems;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; c < chunks;
       c += stride) {
    uint32_t u[kElems];
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      const Philox4 r = philox_group(seed, offset, kStreamDropoutMask,
                                     static_cast<uint64_t>(c) * kGroups + g);
#pragma unroll
      for (int k = 0; k < 4; ++k) u[4 * g + k] = r.x[k];
    }
    const int64_t base = c * kElems;
    acc_t v[kElems];
    load_chunk<scalar_t, acc_t, kElems, kAligned>(x, base, n, v);
#pragma unroll
    for (int k = 0; k < kElems; ++k) v[k] = keep(u[k], threshold) ? v[k] * scale : acc_t(0);
    store_chunk<scalar_t, acc_t, kElems, kAligned>(y, base, n, v);
  }
}

template <typename scalar_t, typename acc_t>
void launch(const scalar_t* x, scalar_t* y, int64_t n, uint64_t threshold, acc_t scale,
            const int64_t* rng) {
  constexpr int kGroups = ChunkShape<scalar_t>::kGroups;
  constexpr int kElems = ChunkShape<scalar_t>::kElems;
  constexpr uintptr_t kAlign = ChunkShape<scalar_t>::kAlign;
  const int64_t chunks = (n + kElems - 1) / kElems;
  const int blocks = cuda::grid_size((chunks + kThreads - 1) / kThreads, kThreads);
  const bool aligned = cuda::is_aligned(x, kAlign) && cuda::is_aligned(y, kAlign);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  BOOL_SWITCH(aligned, kAligned, [&] {
    dropout_kernel<scalar_t, acc_t, kGroups, kAligned>
        <<<blocks, kThreads, 0, stream>>>(x, y, n, threshold, scale, rng);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void dropout_into(const at::Tensor& x, at::Tensor& y, double p, const at::Tensor& rng) {
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const uint64_t threshold = dropout_threshold(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.numel(),
                            threshold, dropout_scale<acc_t>(p), rng.const_data_ptr<int64_t>());
  });
}

at::Tensor dropout_cuda(const at::Tensor& x, double p, const at::Tensor& rng) {
  return dropout_out_of_place(x, p, rng, &dropout_into);
}

void dropout_cuda_(at::Tensor& x, double p, const at::Tensor& rng) { dropout_in_place(x, p, rng, &dropout_into); }

}  // namespace

TORCH_LIBRARY_IMPL(dropreg, CUDA, m) {
  m.impl("dropout", &dropout_cuda);
  m.impl("dropout_", &dropout_cuda_);
}

}  // namespace dropreg
