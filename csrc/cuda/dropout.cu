// Fused dropout on CUDA: Philox mask + scale in one pass, no mask tensor.
// Bytes per element: read x, write y (2·sizeof(T)), the floor of any out-of-place elementwise op.
// Each thread handles chunks of 8 elements, one Philox call (the 16-bit keep test), with 16-byte
// vector loads and stores (cuda_utils.cuh), in a grid-stride loop. (seed, offset) come from device
// memory or from torch's generator's Philox state (rng.cuh), so a launch needs no host sync and is
// safe to capture in a CUDA graph.
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
#include "rng.cuh"
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
                   const cuda::RngArg rng) {
  constexpr int kElems = kU16PerGroup;
  const cuda::RngState state = cuda::load_rng(rng);
  cuda::store_rng(rng, state);
  const uint64_t seed = state.seed;
  const uint64_t offset = state.offset;
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
            const cuda::RngArg& rng) {
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

// y = dropout(x), both contiguous (y may be x). A draw op's launch always runs the kernel, which
// writes the state it drew (also for an empty x or p = 1).
void launch_dropout(const at::Tensor& x, at::Tensor& y, double p, const cuda::RngArg& rng) {
  const bool writes_state = rng.out != nullptr;
  if (x.numel() == 0 && !writes_state) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const uint32_t threshold = dropout_threshold(p);
  if (threshold >= 65536u && !writes_state) {  // everything dropped: a memset, no Philox
    y.zero_();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.numel(),
                            threshold, dropout_scale<acc_t>(p), rng);
  });
}

void dropout_into(const at::Tensor& x, at::Tensor& y, double p, const at::Tensor& rng) {
  launch_dropout(x, y, p, cuda::given_rng(rng));
}

at::Tensor dropout_cuda(const at::Tensor& x, double p, const at::Tensor& rng) {
  return dropout_out_of_place(x, p, rng, &dropout_into);
}

void dropout_cuda_(at::Tensor& x, double p, const at::Tensor& rng) { dropout_in_place(x, p, rng, &dropout_into); }

std::tuple<at::Tensor, at::Tensor> dropout_draw_cuda(const at::Tensor& x, double p, std::optional<int64_t> seed) {
  check_dropout_draw_args(x, p);
  auto [rng, state] = cuda::draw_rng(x, seed);
  at::Tensor y = into_layout_of(x, [&](const at::Tensor& xc, at::Tensor& yc) { launch_dropout(xc, yc, p, rng); });
  return {y, state};
}

at::Tensor dropout_draw_cuda_(at::Tensor& x, double p, std::optional<int64_t> seed) {
  check_dropout_draw_args(x, p);
  TORCH_CHECK(x.is_contiguous(), "argument 'x' of dropout_draw_ must be contiguous");
  auto [rng, state] = cuda::draw_rng(x, seed);
  launch_dropout(x, x, p, rng);
  return state;
}

}  // namespace

TORCH_LIBRARY_IMPL(dropreg, CUDA, m) {
  m.impl("dropout", &dropout_cuda);
  m.impl("dropout_", &dropout_cuda_);
  m.impl("dropout_draw", &dropout_draw_cuda);
  m.impl("dropout_draw_", &dropout_draw_cuda_);
}

}  // namespace dropreg
