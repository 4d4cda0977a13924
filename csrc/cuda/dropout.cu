// Fused dropout on CUDA: Philox mask + scale in one pass, no mask tensor.
// Bytes per element: read x, write y (2·sizeof(T)), the floor of any out-of-place elementwise op.
// Each thread handles chunks of 16 bytes (4 elements per Philox call, 2 calls for 2-byte types)
// with one aligned vector load and store, in a grid-stride loop. (seed, offset) are read from
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
#include "dropout.h"

namespace dropreg {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, int kElems>
struct alignas(sizeof(scalar_t) * kElems) AlignedVec {
  scalar_t v[kElems];
};

// kGroups Philox calls (4·kGroups elements) per chunk; kAligned: x and y are aligned to a chunk.
template <typename scalar_t, typename acc_t, int kGroups, bool kAligned>
__global__ void __launch_bounds__(kThreads)
    dropout_kernel(const scalar_t* x, scalar_t* y, int64_t n, uint64_t threshold, acc_t scale,
                   const int64_t* __restrict__ rng) {
  constexpr int kElems = 4 * kGroups;
  using Vec = AlignedVec<scalar_t, kElems>;
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
    if (kAligned && base + kElems <= n) {
      Vec in = *reinterpret_cast<const Vec*>(x + base);
      Vec out;
#pragma unroll
      for (int k = 0; k < kElems; ++k) {
        out.v[k] = dropout_element<scalar_t, acc_t>(in.v[k], u[k], threshold, scale);
      }
      *reinterpret_cast<Vec*>(y + base) = out;
    } else {
#pragma unroll
      for (int k = 0; k < kElems; ++k) {
        if (base + k < n) y[base + k] = dropout_element<scalar_t, acc_t>(x[base + k], u[k], threshold, scale);
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void launch(const scalar_t* x, scalar_t* y, int64_t n, uint64_t threshold, acc_t scale,
            const int64_t* rng) {
  constexpr int kGroups = sizeof(scalar_t) >= 4 ? 1 : 16 / (4 * sizeof(scalar_t));
  constexpr int kElems = 4 * kGroups;
  constexpr uintptr_t kAlign = sizeof(scalar_t) * kElems;
  const int64_t chunks = (n + kElems - 1) / kElems;
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const int64_t max_blocks =
      static_cast<int64_t>(props->multiProcessorCount) * (props->maxThreadsPerMultiProcessor / kThreads);
  const int blocks = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>((chunks + kThreads - 1) / kThreads, max_blocks)));
  const bool aligned = reinterpret_cast<uintptr_t>(x) % kAlign == 0 &&
                       reinterpret_cast<uintptr_t>(y) % kAlign == 0;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (aligned) {
    dropout_kernel<scalar_t, acc_t, kGroups, true>
        <<<blocks, kThreads, 0, stream>>>(x, y, n, threshold, scale, rng);
  } else {
    dropout_kernel<scalar_t, acc_t, kGroups, false>
        <<<blocks, kThreads, 0, stream>>>(x, y, n, threshold, scale, rng);
  }
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

void check_args(const at::Tensor& x, double p, const at::Tensor& rng) {
  DROPREG_CHECK_FLOATING(x);
  DROPREG_CHECK_PROB(p);
  DROPREG_CHECK_RNG(rng, x);
}

at::Tensor dropout_cuda(const at::Tensor& x, double p, const at::Tensor& rng) {
  check_args(x, p, rng);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc, at::MemoryFormat::Contiguous);
  dropout_into(xc, y, p, rng.contiguous());
  return y;
}

void dropout_cuda_(at::Tensor& x, double p, const at::Tensor& rng) {
  check_args(x, p, rng);
  TORCH_CHECK(x.is_contiguous(), "argument 'x' of dropout_ must be contiguous");
  dropout_into(x, x, p, rng.contiguous());
}

}  // namespace

TORCH_LIBRARY_IMPL(dropreg, CUDA, m) {
  m.impl("dropout", &dropout_cuda);
  m.impl("dropout_", &dropout_cuda_);
}

}  // namespace dropreg
