// Fused dropout on CUDA: Philox mask + scale in one pass, no mask tensor.
// Bytes per element: read x, write y (2·sizeof(T)), the floor of any out-of-place elementwise op.
// Each thread handles chunks of 8 elements, one Philox call (the 16-bit keep test), with 16-byte
// vector loads and stores (cuda_utils.cuh), in a grid-stride loop. (seed, offset) are read from
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

// One Philox call (8 elements at the u16 density) per chunk; kAligned: x and y are 16-byte aligned.
template <typename scalar_t, typename acc_t, bool kAligned>
__global__ void __launch_bounds__(kThreads)
    dropout_kernel(const scalar_t* x, scalar_t* y, int64_t n, uint32_t threshold, acc_t scale,
                   const int64_t* __restrict__ rng) {
  constexpr int kElems = kU16PerGroup;
  const uint64_t seed = static_cast<uint64_t>(rng[0]);
  const uint64_t offset = static_cast<uint64_t>(rng[1]);
  const int64_t chunks = (n + kElems - 1) / kElems;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; c < chunks;
       c += stride) {
    const int64_t base = c * kElems;
    acc_t v[kElems];
    // The load first: its latency hides behind the ten Philox rounds that do not depend on it.
    load_chunk<scalar_t, acc_t, kElems, kAligned>(x, base, n, v);
    const Philox4 r = philox_group(seed, offset, kStreamDropoutMask, static_cast<uint64_t>(c));
#pragma unroll
    for (int k = 0; k < kElems; ++k) v[k] = keep(group_u16(r, k), threshold) ? v[k] * scale : acc_t(0);
    store_chunk<scalar_t, acc_t, kElems, kAligned>(y, base, n, v);
  }
}

template <typename scalar_t, typename acc_t>
void launch(const scalar_t* x, scalar_t* y, int64_t n, uint32_t threshold, acc_t scale,
            const int64_t* rng) {
  constexpr int kElems = kU16PerGroup;
  constexpr uintptr_t kAlign = ChunkShape<scalar_t, kU16PerGroup>::kAlign;
  const int64_t chunks = (n + kElems - 1) / kElems;
  const bool aligned = cuda::is_aligned(x, kAlign) && cuda::is_aligned(y, kAlign);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  BOOL_SWITCH(aligned, kAligned, [&] {
    const auto kernel = dropout_kernel<scalar_t, acc_t, kAligned>;
    const int blocks = cuda::grid_size(kernel, (chunks + kThreads - 1) / kThreads, kThreads);
    kernel<<<blocks, kThreads, 0, stream>>>(x, y, n, threshold, scale, rng);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void dropout_into(const at::Tensor& x, at::Tensor& y, double p, const at::Tensor& rng) {
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const uint32_t threshold = dropout_threshold(p);
  if (threshold >= 65536u) {  // everything dropped: a memset, no Philox
    y.zero_();
    return;
  }
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
