// Site penalty on CUDA (docs/design.md §2, fused op 3).
//
//   site_penalty           out = [Σ (g_e·h)², Σ g_i·η·h]  (2,) acc_t, η regenerated from rng
//                          bytes/elem: read h, g_e, g_i (3·sizeof(T) with both terms).
//   site_penalty_backward  for grad = [a, b] (read on the device):
//                          dh = 2a·g_e²·h + b·g_i·η,  dg_e = 2a·g_e·h²,  dg_i = b·η·h
//                          bytes/elem: read h, g_e, g_i, write dh, dg_e, dg_i (6·sizeof(T)).
// Missing g_e / g_i drop their terms (and their loads). η is the site-noise stream of the logical
// contiguous index of h (regularizer.h): forward and backward see the same η, never stored.
//
// The forward reduction is deterministic and independent of the device: stage 1 runs a grid of
// G = min(ceil(n / 4096), 1024) blocks that depends on n only; thread j of block b sums the
// chunks b·T + j, (G + b)·T + j, ... in order (in double), each block reduces its threads in a
// fixed tree and writes one partial per term; stage 2, one block, sums the G partials in a fixed
// tree and rounds once to acc_t. No atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>

#include "cuda_utils.cuh"
#include "dropout.h"
#include "philox.h"
#include "regularizer.h"
#include "site_penalty_host.h"
#include "static_switch.h"

namespace dropreg {
namespace {

constexpr int kThreads = 256;             // stage 1 and backward
constexpr int kFinalThreads = 256;        // stage 2
constexpr int64_t kElemsPerBlock = 4096;  // stage-1 grid: one block per 4096 elements ...
constexpr int64_t kMaxPartials = 1024;    // ... up to 1024 blocks (one resident wave on H100/H200)

using cuda::ChunkShape;
using cuda::is_aligned;
using cuda::kFullMask;
using cuda::kWarpSize;
using cuda::load_chunk;
using cuda::store_chunk;

// What every site-noise kernel needs to regenerate η.
template <typename acc_t>
struct NoiseParams {
  int kind;            // NoiseKind
  acc_t amplitude;     // sqrt(q/(1-q)) (rademacher) or q'/(1-q') (dropout, q' quantized)
  uint32_t threshold;  // round(q·2^16), dropout noise only
};


// eta[e] = η of flat element base + e. Chunks are 8 elements (ChunkShape<scalar_t, 8>) at multiples
// of 8, which divides both densities' calls (8 u16s, 128 bits): the chunk lies in one Philox call.
template <typename acc_t, int kElems>
__device__ __forceinline__ void site_noise_chunk(uint64_t seed, uint64_t offset, int64_t base,
                                                 const NoiseParams<acc_t>& noise, acc_t (&eta)[kElems]) {
  static_assert(kU16PerGroup % kElems == 0, "a chunk must lie in one Philox call");
  const Philox4 r = philox_group(seed, offset, kStreamSiteNoise,
                                 site_noise_group(static_cast<uint64_t>(base), noise.kind));
#pragma unroll
  for (int e = 0; e < kElems; ++e) {
    const uint32_t draw = site_noise_draw(r, static_cast<uint64_t>(base + e), noise.kind);
    eta[e] = site_noise_value<acc_t>(draw, noise.kind, noise.amplitude, noise.threshold);
  }
}

// Sum of v over the block in a fixed tree (warp shuffles, then the warps in index order);
// the result is valid in thread 0. Every thread of the block must call it.
template <int kBlockThreads>
__device__ __forceinline__ double block_sum(double v, double* sh /* [kBlockThreads / 32] */) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v += __shfl_down_sync(kFullMask, v, off);
  if (threadIdx.x % kWarpSize == 0) sh[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kBlockThreads / kWarpSize; ++w) total += sh[w];
  }
  __syncthreads();  // sh may be reused by the caller's next block_sum
  return total;
}

// ---------------------------------------------------------------------------------------------
// site_penalty: stage 1 (per-block partials) and stage 2 (one block).
// ---------------------------------------------------------------------------------------------

// h, g_e, g_i: (n,) flat contiguous; g_e / g_i may be null (term skipped).
// partials: (2, gridDim.x) double: row 0 explicit, row 1 implicit.
// Min 4 blocks per SM (<= 64 registers): the 1024-block grid then takes two full waves on 132
// SMs instead of three with a short tail.
template <typename scalar_t, typename acc_t, bool kAligned>
__global__ void __launch_bounds__(kThreads, 4)
    site_penalty_partials_kernel(const scalar_t* __restrict__ h, const scalar_t* __restrict__ g_e,
                                 const scalar_t* __restrict__ g_i, int64_t n,
                                 NoiseParams<acc_t> noise, const int64_t* __restrict__ rng,
                                 double* __restrict__ partials) {
  constexpr int kElems = ChunkShape<scalar_t, kU16PerGroup>::kElems;
  __shared__ double sh[kThreads / kWarpSize];
  const uint64_t seed = static_cast<uint64_t>(rng[0]);
  const uint64_t offset = static_cast<uint64_t>(rng[1]);
  const int64_t chunks = (n + kElems - 1) / kElems;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  // Per-element terms are rounded in acc_t, as in the reference; the running sums are double so
  // that a thread's ~n / 2^18 sequential additions lose nothing a float32 tree sum would keep.
  double sum_e = 0.0;
  double sum_i = 0.0;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; k < chunks;
       k += stride) {
    const int64_t base = k * kElems;
    acc_t hx[kElems];
    load_chunk<scalar_t, acc_t, kElems, kAligned>(h, base, n, hx);
    if (g_e != nullptr) {
      acc_t gx[kElems];
      load_chunk<scalar_t, acc_t, kElems, kAligned>(g_e, base, n, gx);
#pragma unroll
      for (int e = 0; e < kElems; ++e) {
        if (base + e < n) sum_e += static_cast<double>(site_explicit_term<acc_t>(gx[e], hx[e]));
      }
    }
    if (g_i != nullptr) {
      acc_t gx[kElems];
      acc_t eta[kElems];
      load_chunk<scalar_t, acc_t, kElems, kAligned>(g_i, base, n, gx);
      site_noise_chunk<acc_t, kElems>(seed, offset, base, noise, eta);
#pragma unroll
      for (int e = 0; e < kElems; ++e) {
        if (base + e < n) {
          sum_i += static_cast<double>(site_implicit_term<acc_t>(gx[e], eta[e], hx[e]));
        }
      }
    }
  }
  sum_e = block_sum<kThreads>(sum_e, sh);
  sum_i = block_sum<kThreads>(sum_i, sh);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = sum_e;
    partials[gridDim.x + blockIdx.x] = sum_i;
  }
}

// partials: (2, num_partials) double; out: (2,) acc_t. One block.
template <typename acc_t>
__global__ void __launch_bounds__(kFinalThreads)
    site_penalty_final_kernel(const double* __restrict__ partials, int num_partials,
                              acc_t* __restrict__ out) {
  __shared__ double sh[kFinalThreads / kWarpSize];
  double sum_e = 0.0;
  double sum_i = 0.0;
  for (int j = threadIdx.x; j < num_partials; j += kFinalThreads) {
    sum_e += partials[j];
    sum_i += partials[num_partials + j];
  }
  sum_e = block_sum<kFinalThreads>(sum_e, sh);
  sum_i = block_sum<kFinalThreads>(sum_i, sh);
  if (threadIdx.x == 0) {
    out[0] = static_cast<acc_t>(sum_e);
    out[1] = static_cast<acc_t>(sum_i);
  }
}

// ---------------------------------------------------------------------------------------------
// site_penalty_backward: elementwise.
// ---------------------------------------------------------------------------------------------

// grad: (2,) acc_t [a, b] on the device; h, dh: (n,); g_e, dg_e and g_i, dg_i: (n,) or null
// (both null together).
template <typename scalar_t, typename acc_t, bool kAligned>
__global__ void __launch_bounds__(kThreads)
    site_penalty_backward_kernel(const acc_t* __restrict__ grad, const scalar_t* __restrict__ h,
                                 const scalar_t* __restrict__ g_e,
                                 const scalar_t* __restrict__ g_i, scalar_t* __restrict__ dh,
                                 scalar_t* __restrict__ dg_e, scalar_t* __restrict__ dg_i,
                                 int64_t n, NoiseParams<acc_t> noise,
                                 const int64_t* __restrict__ rng) {
  constexpr int kElems = ChunkShape<scalar_t, kU16PerGroup>::kElems;
  const acc_t a2 = acc_t(2) * grad[0];
  const acc_t b = grad[1];
  const uint64_t seed = static_cast<uint64_t>(rng[0]);
  const uint64_t offset = static_cast<uint64_t>(rng[1]);
  const int64_t chunks = (n + kElems - 1) / kElems;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; k < chunks;
       k += stride) {
    const int64_t base = k * kElems;
    acc_t hx[kElems];
    acc_t dhx[kElems];
    load_chunk<scalar_t, acc_t, kElems, kAligned>(h, base, n, hx);
#pragma unroll
    for (int e = 0; e < kElems; ++e) dhx[e] = acc_t(0);
    if (g_e != nullptr) {
      acc_t gx[kElems];
      acc_t dgx[kElems];
      load_chunk<scalar_t, acc_t, kElems, kAligned>(g_e, base, n, gx);
#pragma unroll
      for (int e = 0; e < kElems; ++e) {
        // 0 + term, as the reference's zeros + ...: a -0 term gives +0 there too.
        dhx[e] = add_rn(dhx[e], site_dh_explicit<acc_t>(a2, gx[e], hx[e]));
        dgx[e] = site_dg_explicit<acc_t>(a2, gx[e], hx[e]);
      }
      store_chunk<scalar_t, acc_t, kElems, kAligned>(dg_e, base, n, dgx);
    }
    if (g_i != nullptr) {
      acc_t gx[kElems];
      acc_t eta[kElems];
      acc_t dgx[kElems];
      load_chunk<scalar_t, acc_t, kElems, kAligned>(g_i, base, n, gx);
      site_noise_chunk<acc_t, kElems>(seed, offset, base, noise, eta);
#pragma unroll
      for (int e = 0; e < kElems; ++e) {
        dhx[e] = add_rn(dhx[e], site_dh_implicit<acc_t>(b, gx[e], eta[e]));
        dgx[e] = site_dg_implicit<acc_t>(b, eta[e], hx[e]);
      }
      store_chunk<scalar_t, acc_t, kElems, kAligned>(dg_i, base, n, dgx);
    }
    store_chunk<scalar_t, acc_t, kElems, kAligned>(dh, base, n, dhx);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: argument checks, allocation, dispatch.
// ---------------------------------------------------------------------------------------------

// The noise parameters in acc_t.
template <typename acc_t>
NoiseParams<acc_t> noise_params(double q, NoiseKind kind) {
  return NoiseParams<acc_t>{static_cast<int>(kind),
                            static_cast<acc_t>(site_noise_amplitude(q, kind)),
                            dropout_threshold(q)};
}

at::Tensor site_penalty_cuda(const at::Tensor& h, const std::optional<at::Tensor>& g_e,
                             const std::optional<at::Tensor>& g_i, double q,
                             c10::string_view noise, const at::Tensor& rng) {
  const NoiseKind kind = check_site_args(h, g_e, g_i, q, std::string(noise), rng);
  const c10::cuda::CUDAGuard guard(h.device());
  at::Tensor out = at::empty({2}, h.options().dtype(acc_type(h)));
  const int64_t n = h.numel();
  if (n == 0 || (!g_e.has_value() && !g_i.has_value())) return out.zero_();
  const at::Tensor hc = h.contiguous();
  const at::Tensor ec = contiguous_or_undefined(g_e);
  const at::Tensor ic = contiguous_or_undefined(g_i);
  const at::Tensor rc = rng.contiguous();
  const int num_partials = static_cast<int>(
      std::min<int64_t>((n + kElemsPerBlock - 1) / kElemsPerBlock, kMaxPartials));
  at::Tensor partials = at::empty({2 * num_partials}, h.options().dtype(at::kDouble));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, hc.scalar_type(), "site_penalty_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        constexpr uintptr_t kAlign = ChunkShape<scalar_t, kU16PerGroup>::kAlign;
        const scalar_t* hp = hc.const_data_ptr<scalar_t>();
        const scalar_t* ep = const_ptr_or_null<scalar_t>(ec);
        const scalar_t* ip = const_ptr_or_null<scalar_t>(ic);
        const NoiseParams<acc_t> np = noise_params<acc_t>(q, kind);
        const int64_t* rp = rc.const_data_ptr<int64_t>();
        double* pp = partials.data_ptr<double>();
        const bool aligned = is_aligned(hp, kAlign) && is_aligned(ep, kAlign) && is_aligned(ip, kAlign);
        BOOL_SWITCH(aligned, kAligned, [&] {
          site_penalty_partials_kernel<scalar_t, acc_t, kAligned>
              <<<num_partials, kThreads, 0, stream>>>(hp, ep, ip, n, np, rp, pp);
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        site_penalty_final_kernel<acc_t><<<1, kFinalThreads, 0, stream>>>(
            partials.const_data_ptr<double>(), num_partials, out.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> site_penalty_backward_cuda(
    const at::Tensor& grad, const at::Tensor& h, const std::optional<at::Tensor>& g_e,
    const std::optional<at::Tensor>& g_i, double q, c10::string_view noise, const at::Tensor& rng) {
  const NoiseKind kind = check_site_args(h, g_e, g_i, q, std::string(noise), rng);
  check_site_output_grad(grad, h);
  const c10::cuda::CUDAGuard guard(h.device());
  const at::Tensor hc = h.contiguous();
  const at::Tensor ec = contiguous_or_undefined(g_e);
  const at::Tensor ic = contiguous_or_undefined(g_i);
  at::Tensor grad_h = at::empty_like(hc, at::MemoryFormat::Contiguous);
  at::Tensor grad_g_e = empty_like_or_none(ec, h);
  at::Tensor grad_g_i = empty_like_or_none(ic, h);
  const int64_t n = hc.numel();
  if (n == 0) return {grad_h, grad_g_e, grad_g_i};
  const at::Tensor gc = grad.contiguous();
  const at::Tensor rc = rng.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, hc.scalar_type(), "site_penalty_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        constexpr int kElems = ChunkShape<scalar_t, kU16PerGroup>::kElems;
        constexpr uintptr_t kAlign = ChunkShape<scalar_t, kU16PerGroup>::kAlign;
        const int64_t chunks = (n + kElems - 1) / kElems;
        const scalar_t* hp = hc.const_data_ptr<scalar_t>();
        const scalar_t* ep = const_ptr_or_null<scalar_t>(ec);
        const scalar_t* ip = const_ptr_or_null<scalar_t>(ic);
        scalar_t* dhp = grad_h.data_ptr<scalar_t>();
        scalar_t* dep = ec.defined() ? grad_g_e.data_ptr<scalar_t>() : nullptr;
        scalar_t* dip = ic.defined() ? grad_g_i.data_ptr<scalar_t>() : nullptr;
        const NoiseParams<acc_t> np = noise_params<acc_t>(q, kind);
        const bool aligned = is_aligned(hp, kAlign) && is_aligned(ep, kAlign) &&
                             is_aligned(ip, kAlign) && is_aligned(dhp, kAlign) &&
                             is_aligned(dep, kAlign) && is_aligned(dip, kAlign);
        BOOL_SWITCH(aligned, kAligned, [&] {
          const auto kernel = site_penalty_backward_kernel<scalar_t, acc_t, kAligned>;
          const int blocks = cuda::grid_size(kernel, (chunks + kThreads - 1) / kThreads, kThreads);
          kernel<<<blocks, kThreads, 0, stream>>>(gc.const_data_ptr<acc_t>(), hp, ep, ip, dhp, dep, dip, n, np,
                                                  rc.const_data_ptr<int64_t>());
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {grad_h, grad_g_e, grad_g_i};
}

}  // namespace

TORCH_LIBRARY_IMPL(dropreg, CUDA, m) {
  m.impl("site_penalty", &site_penalty_cuda);
  m.impl("site_penalty_backward", &site_penalty_backward_cuda);
}

}  // namespace dropreg
