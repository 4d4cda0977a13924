// Raw Philox4x32-10 on CUDA (see cpu/philox.cpp): one thread per counter.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "philox.h"

namespace dropreg {
namespace {

__global__ void philox_kernel(const int64_t* __restrict__ c, const int64_t* __restrict__ k,
                              int64_t* __restrict__ out, int64_t n) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n) return;
  const Philox4 w = philox4x32_10(
      static_cast<uint32_t>(c[4 * r]), static_cast<uint32_t>(c[4 * r + 1]),
      static_cast<uint32_t>(c[4 * r + 2]), static_cast<uint32_t>(c[4 * r + 3]),
      static_cast<uint32_t>(k[2 * r]), static_cast<uint32_t>(k[2 * r + 1]));
#pragma unroll
  for (int j = 0; j < 4; ++j) out[4 * r + j] = static_cast<int64_t>(w.x[j]);
}

at::Tensor philox_cuda(const at::Tensor& counter, const at::Tensor& key) {
  check_philox_args(counter, key);
  const c10::cuda::CUDAGuard guard(counter.device());
  const at::Tensor c = counter.contiguous();
  const at::Tensor k = key.contiguous();
  at::Tensor out = at::empty_like(c);
  const int64_t n = c.size(0);
  if (n == 0) return out;
  constexpr int kThreads = 256;
  philox_kernel<<<static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0,
                  at::cuda::getCurrentCUDAStream()>>>(c.const_data_ptr<int64_t>(),
                                                      k.const_data_ptr<int64_t>(),
                                                      out.data_ptr<int64_t>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dropreg, CUDA, m) { m.impl("philox", &philox_cuda); }

}  // namespace dropreg
