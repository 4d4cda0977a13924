// Site penalty on CUDA (docs/design.md §2, fused op 3).
//
//   site_penalty           out = [Σ (g_e·h)², Σ g_i·η·h]  (2,) acc_t, η regenerated from rng
//                          bytes/elem: read h, g_e, g_i (3·sizeof(T) with both terms).
//   site_penalty_backward  for grad = [a, b] (read on the device):
//                          dh = 2a·g_e²·h + b·g_i·η,  dg_e = 2a·g_e·h²,  dg_i = b·η·h
//                          bytes/elem: read h, g_e, g_i, write dh, dg_e, dg_i (6·sizeof(T)).
// Missing g_e / g_i drop their terms and their loads: which ones are given is a template flag, so
// the loop holds no null checks and a chunk's loads are all issued before its arithmetic. η is the
// site-noise stream of the logical contiguous index of h (site_penalty.h): forward and backward see
// the same η, never stored. Elements are taken in chunks of 8 (one Philox call of the u16
// density), with 16-byte vector accesses when every tensor is aligned.
//
// The forward reduction is deterministic and independent of the device: the chunks are cut into
// S slabs of P·256 chunks, S and P functions of n only (S <= kMaxSlabs); thread j of a slab sums
// the slab's chunks j, 256 + j, ... in order (in double), the 256 threads are reduced in a fixed
// tree and the slab writes one partial per term; a second kernel, one block, sums the S partials
// in a fixed tree and rounds once to acc_t. Stage 1's grid is one resident wave (from the
// occupancy calculator) looping over the slabs, so the device only decides which block computes
// which slab, never what it sums. No atomics.
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
#include "rng.cuh"
#include "site_penalty.h"
#include "site_penalty_host.h"
#include "static_switch.h"

namespace dropreg {
namespace {

constexpr int kThreads = 256;        // stage 1 and backward
constexpr int kFinalThreads = 256;   // stage 2
constexpr int64_t kMaxSlabs = 8192;  // stage-1 partials: 8 slabs a block on a 1024-block wave,
                                     // so the last round of slabs leaves few SMs idle

using cuda::ChunkShape;
using cuda::is_aligned;
using cuda::kFullMask;
using cuda::kWarpSize;

// What every site-noise kernel needs to regenerate η.
template <typename acc_t>
struct NoiseParams {
  int kind;            // NoiseKind
  acc_t amplitude;     // sqrt(q/(1-q)) (rademacher) or q'/(1-q') (dropout, q' quantized)
  uint32_t threshold;  // round(q·2^16), dropout noise only
};

// Chunks of 8 elements at multiples of 8, which divides both noise densities' calls (8 u16s, 128
// bits): a chunk lies in one Philox call.
template <typename scalar_t>
using SiteChunk = ChunkShape<scalar_t, kU16PerGroup>;

// The chunk at flat index base of h and the given g_e / g_i, in acc_t (elements at n and beyond
// read as 0, never used): one branch for the three, all loads issued before any arithmetic, vector
// loads when every tensor is aligned (`vec`) and the chunk is whole.
template <typename scalar_t, typename acc_t, bool kHasGe, bool kHasGi, int kElems>
__device__ __forceinline__ void load_site_chunks(const scalar_t* __restrict__ h, const scalar_t* __restrict__ g_e,
                                                 const scalar_t* __restrict__ g_i, int64_t base, int64_t n, bool vec,
                                                 acc_t (&hx)[kElems], acc_t (&ex)[kElems], acc_t (&ix)[kElems]) {
  if (vec && base + kElems <= n) {
    cuda::load_chunk<scalar_t, acc_t, kElems, true>(h, base, n, hx);
    if constexpr (kHasGe) cuda::load_chunk<scalar_t, acc_t, kElems, true>(g_e, base, n, ex);
    if constexpr (kHasGi) cuda::load_chunk<scalar_t, acc_t, kElems, true>(g_i, base, n, ix);
  } else {
    cuda::load_chunk<scalar_t, acc_t, kElems, false>(h, base, n, hx);
    if constexpr (kHasGe) cuda::load_chunk<scalar_t, acc_t, kElems, false>(g_e, base, n, ex);
    if constexpr (kHasGi) cuda::load_chunk<scalar_t, acc_t, kElems, false>(g_i, base, n, ix);
  }
}

// Stores y at flat index base (elements below n), with vector stores as load_site_chunks.
template <typename scalar_t, typename acc_t, int kElems>
__device__ __forceinline__ void store_site_chunk(scalar_t* __restrict__ dst, int64_t base, int64_t n, bool vec,
                                                 const acc_t (&y)[kElems]) {
  if (vec && base + kElems <= n) {
    cuda::store_chunk<scalar_t, acc_t, kElems, true>(dst, base, n, y);
  } else {
    cuda::store_chunk<scalar_t, acc_t, kElems, false>(dst, base, n, y);
  }
}

// eta[e] = η of flat element base + e (base a multiple of 8: the chunk lies in one Philox call).
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

// (a, b) summed over the block in a fixed tree (warp shuffles, then the warps in index order);
// the result is valid in thread 0. Every thread of the block must call it.
template <int kBlockThreads>
__device__ __forceinline__ void block_sum2(double& a, double& b, double* sh /* [2 · kBlockThreads / 32] */) {
  constexpr int kWarps = kBlockThreads / kWarpSize;
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) {
    a += __shfl_down_sync(kFullMask, a, off);
    b += __shfl_down_sync(kFullMask, b, off);
  }
  if (threadIdx.x % kWarpSize == 0) {
    sh[threadIdx.x / kWarpSize] = a;
    sh[kWarps + threadIdx.x / kWarpSize] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    a = 0.0;
    b = 0.0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      a += sh[w];
      b += sh[kWarps + w];
    }
  }
  __syncthreads();  // sh is reused by the next slab
}

// ---------------------------------------------------------------------------------------------
// site_penalty: stage 1 (per-slab partials) and stage 2 (one block).
// ---------------------------------------------------------------------------------------------

// The slab layout of the forward reduction: a function of n only.
struct SlabPlan {
  int64_t per_thread;  // chunks a thread sums in a slab
  int64_t slabs;
};

SlabPlan slab_plan(int64_t n) {
  const int64_t chunks = (n + kU16PerGroup - 1) / kU16PerGroup;
  const int64_t per_thread = std::max<int64_t>(1, (chunks + kThreads * kMaxSlabs - 1) / (kThreads * kMaxSlabs));
  return {per_thread, (chunks + kThreads * per_thread - 1) / (kThreads * per_thread)};
}

// h, g_e, g_i: (n,) flat contiguous (g_e / g_i only read when kHasGe / kHasGi).
// partials: (2, slabs) double: row 0 explicit, row 1 implicit.
// Min 4 blocks per SM (<= 64 registers; double with both terms needs more, 2 blocks).
template <typename scalar_t, typename acc_t, bool kHasGe, bool kHasGi>
__global__ void __launch_bounds__(kThreads, sizeof(scalar_t) == 8 && kHasGe && kHasGi ? 2 : 4)
    site_penalty_partials_kernel(const scalar_t* __restrict__ h, const scalar_t* __restrict__ g_e,
                                 const scalar_t* __restrict__ g_i, int64_t n, bool vec, SlabPlan plan,
                                 NoiseParams<acc_t> noise, const cuda::RngArg rng,
                                 double* __restrict__ partials) {
  constexpr int kElems = SiteChunk<scalar_t>::kElems;
  __shared__ double sh[2 * kThreads / kWarpSize];
  const cuda::RngState state = cuda::load_rng(rng);
  cuda::store_rng(rng, state);
  const uint64_t seed = state.seed;
  const uint64_t offset = state.offset;
  const int64_t chunks = (n + kElems - 1) / kElems;
  for (int64_t slab = blockIdx.x; slab < plan.slabs; slab += gridDim.x) {
    // Per-element terms are rounded in acc_t, as in the reference; the running sums are double so
    // that a thread's sequential additions lose nothing a float32 tree sum would keep.
    double sum_e = 0.0;
    double sum_i = 0.0;
    const int64_t first = slab * plan.per_thread * kThreads + threadIdx.x;
    for (int64_t i = 0; i < plan.per_thread; ++i) {
      const int64_t k = first + i * kThreads;
      if (k >= chunks) break;
      const int64_t base = k * kElems;
      acc_t hx[kElems], ex[kElems], ix[kElems];
      load_site_chunks<scalar_t, acc_t, kHasGe, kHasGi, kElems>(h, g_e, g_i, base, n, vec, hx, ex, ix);
      if constexpr (kHasGi) {
        acc_t eta[kElems];
        site_noise_chunk<acc_t, kElems>(seed, offset, base, noise, eta);
#pragma unroll
        for (int e = 0; e < kElems; ++e) {
          if (base + e < n) sum_i += static_cast<double>(site_implicit_term<acc_t>(ix[e], eta[e], hx[e]));
        }
      }
      if constexpr (kHasGe) {
#pragma unroll
        for (int e = 0; e < kElems; ++e) {
          if (base + e < n) sum_e += static_cast<double>(site_explicit_term<acc_t>(ex[e], hx[e]));
        }
      }
    }
    block_sum2<kThreads>(sum_e, sum_i, sh);
    if (threadIdx.x == 0) {
      partials[slab] = sum_e;
      partials[plan.slabs + slab] = sum_i;
    }
  }
}

// partials: (2, num_partials) double; out: (2,) acc_t. One block.
template <typename acc_t>
__global__ void __launch_bounds__(kFinalThreads)
    site_penalty_final_kernel(const double* __restrict__ partials, int64_t num_partials,
                              acc_t* __restrict__ out) {
  __shared__ double sh[2 * kFinalThreads / kWarpSize];
  double sum_e = 0.0;
  double sum_i = 0.0;
  for (int64_t j = threadIdx.x; j < num_partials; j += kFinalThreads) {
    sum_e += partials[j];
    sum_i += partials[num_partials + j];
  }
  block_sum2<kFinalThreads>(sum_e, sum_i, sh);
  if (threadIdx.x == 0) {
    out[0] = static_cast<acc_t>(sum_e);
    out[1] = static_cast<acc_t>(sum_i);
  }
}

// ---------------------------------------------------------------------------------------------
// site_penalty_backward: elementwise.
// ---------------------------------------------------------------------------------------------

// grad: (2,) acc_t [a, b] on the device; h, dh: (n,); g_e, dg_e (kHasGe) and g_i, dg_i (kHasGi): (n,).
template <typename scalar_t, typename acc_t, bool kHasGe, bool kHasGi>
__global__ void __launch_bounds__(kThreads)
    site_penalty_backward_kernel(const acc_t* __restrict__ grad, const scalar_t* __restrict__ h,
                                 const scalar_t* __restrict__ g_e, const scalar_t* __restrict__ g_i,
                                 scalar_t* __restrict__ dh, scalar_t* __restrict__ dg_e,
                                 scalar_t* __restrict__ dg_i, int64_t n, bool vec, NoiseParams<acc_t> noise,
                                 const cuda::RngArg rng) {
  constexpr int kElems = SiteChunk<scalar_t>::kElems;
  const acc_t a2 = acc_t(2) * grad[0];
  const acc_t b = grad[1];
  const cuda::RngState state = cuda::load_rng(rng);
  const uint64_t seed = state.seed;
  const uint64_t offset = state.offset;
  const int64_t chunks = (n + kElems - 1) / kElems;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; k < chunks; k += stride) {
    const int64_t base = k * kElems;
    acc_t hx[kElems], ex[kElems], ix[kElems], dhx[kElems];
    load_site_chunks<scalar_t, acc_t, kHasGe, kHasGi, kElems>(h, g_e, g_i, base, n, vec, hx, ex, ix);
#pragma unroll
    for (int e = 0; e < kElems; ++e) dhx[e] = acc_t(0);
    if constexpr (kHasGe) {
      acc_t dgx[kElems];
#pragma unroll
      for (int e = 0; e < kElems; ++e) {
        // 0 + term, as the reference's zeros + ...: a -0 term gives +0 there too.
        const SitePartGrad<acc_t> part = site_explicit_grad<acc_t>(a2, ex[e], hx[e]);
        dhx[e] = add_rn(dhx[e], part.dh);
        dgx[e] = part.dg;
      }
      store_site_chunk<scalar_t, acc_t, kElems>(dg_e, base, n, vec, dgx);
    }
    if constexpr (kHasGi) {
      acc_t eta[kElems];
      acc_t dgx[kElems];
      site_noise_chunk<acc_t, kElems>(seed, offset, base, noise, eta);
#pragma unroll
      for (int e = 0; e < kElems; ++e) {
        const SitePartGrad<acc_t> part = site_implicit_grad<acc_t>(b, ix[e], eta[e], hx[e]);
        dhx[e] = add_rn(dhx[e], part.dh);
        dgx[e] = part.dg;
      }
      store_site_chunk<scalar_t, acc_t, kElems>(dg_i, base, n, vec, dgx);
    }
    store_site_chunk<scalar_t, acc_t, kElems>(dh, base, n, vec, dhx);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: argument checks, allocation, dispatch.
// ---------------------------------------------------------------------------------------------

// h, g_e and g_i as the kernels take them (contiguous; null for a missing g_e / g_i).
template <typename scalar_t>
struct SiteInputs {
  const scalar_t* h;
  const scalar_t* g_e;
  const scalar_t* g_i;

  SiteInputs(const at::Tensor& hc, const at::Tensor& ec, const at::Tensor& ic)
      : h(hc.const_data_ptr<scalar_t>()), g_e(const_ptr_or_null<scalar_t>(ec)), g_i(const_ptr_or_null<scalar_t>(ic)) {}

  // Whether the chunks of every given input can be 16-byte vectors.
  bool aligned() const {
    constexpr uintptr_t kAlign = SiteChunk<scalar_t>::kAlign;
    return is_aligned(h, kAlign) && is_aligned(g_e, kAlign) && is_aligned(g_i, kAlign);
  }
};

// The noise parameters in acc_t.
template <typename acc_t>
NoiseParams<acc_t> noise_params(double q, NoiseKind kind) {
  return NoiseParams<acc_t>{static_cast<int>(kind),
                            static_cast<acc_t>(site_noise_amplitude(q, kind)),
                            dropout_threshold(q)};
}

// Stage 1 of the forward and the backward for the given inputs: a template flag each for g_e and
// g_i (at least one of them is given; no kernel is instantiated for neither).
template <typename scalar_t, typename acc_t>
void launch_partials(const SiteInputs<scalar_t>& in, int64_t n, bool vec, const SlabPlan& plan,
                     const NoiseParams<acc_t>& noise, const cuda::RngArg& rng, double* partials,
                     cudaStream_t stream) {
  BOOL_SWITCH(in.g_e != nullptr, kGe, [&] {
    BOOL_SWITCH(in.g_i != nullptr, kGi, [&] {
      if constexpr (kGe || kGi) {
        const auto kernel = site_penalty_partials_kernel<scalar_t, acc_t, kGe, kGi>;
        kernel<<<cuda::grid_size(kernel, plan.slabs, kThreads), kThreads, 0, stream>>>(
            in.h, in.g_e, in.g_i, n, vec, plan, noise, rng, partials);
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t>
void launch_backward(const acc_t* grad, const SiteInputs<scalar_t>& in, scalar_t* dh, scalar_t* dg_e, scalar_t* dg_i,
                     int64_t n, bool vec, const NoiseParams<acc_t>& noise, const cuda::RngArg& rng,
                     cudaStream_t stream) {
  constexpr int kElems = SiteChunk<scalar_t>::kElems;
  const int64_t work = ((n + kElems - 1) / kElems + kThreads - 1) / kThreads;
  BOOL_SWITCH(in.g_e != nullptr, kGe, [&] {
    BOOL_SWITCH(in.g_i != nullptr, kGi, [&] {
      if constexpr (kGe || kGi) {
        const auto kernel = site_penalty_backward_kernel<scalar_t, acc_t, kGe, kGi>;
        kernel<<<cuda::grid_size(kernel, work, kThreads), kThreads, 0, stream>>>(
            grad, in.h, in.g_e, in.g_i, dh, dg_e, dg_i, n, vec, noise, rng);
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The forward at the state `rng` (a draw op's launch writes the state it drew, whatever the inputs).
at::Tensor launch_site_penalty(const at::Tensor& h, const std::optional<at::Tensor>& g_e,
                               const std::optional<at::Tensor>& g_i, double q, NoiseKind kind,
                               const cuda::RngArg& rng) {
  const c10::cuda::CUDAGuard guard(h.device());
  at::Tensor out = at::empty({2}, h.options().dtype(acc_type(h)));
  const int64_t n = h.numel();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (n == 0 || (!g_e.has_value() && !g_i.has_value())) {
    if (rng.out != nullptr) cuda::write_rng(rng, stream);
    return out.zero_();
  }
  const at::Tensor hc = h.contiguous();
  const at::Tensor ec = contiguous_or_undefined(g_e);
  const at::Tensor ic = contiguous_or_undefined(g_i);
  const SlabPlan plan = slab_plan(n);
  at::Tensor partials = at::empty({2 * plan.slabs}, h.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, hc.scalar_type(), "site_penalty_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const SiteInputs<scalar_t> in(hc, ec, ic);
        launch_partials<scalar_t, acc_t>(in, n, in.aligned(), plan, noise_params<acc_t>(q, kind), rng,
                                         partials.data_ptr<double>(), stream);
        site_penalty_final_kernel<acc_t><<<1, kFinalThreads, 0, stream>>>(
            partials.const_data_ptr<double>(), plan.slabs, out.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

at::Tensor site_penalty_cuda(const at::Tensor& h, const std::optional<at::Tensor>& g_e,
                             const std::optional<at::Tensor>& g_i, double q,
                             c10::string_view noise, const at::Tensor& rng) {
  const NoiseKind kind = check_site_args(h, g_e, g_i, q, std::string(noise), rng);
  const at::Tensor rc = rng.contiguous();
  return launch_site_penalty(h, g_e, g_i, q, kind, cuda::given_rng(rc));
}

std::tuple<at::Tensor, at::Tensor> site_penalty_draw_cuda(const at::Tensor& h, const std::optional<at::Tensor>& g_e,
                                                          const std::optional<at::Tensor>& g_i, double q,
                                                          c10::string_view noise, std::optional<int64_t> seed) {
  const NoiseKind kind = check_site_draw_args(h, g_e, g_i, q, std::string(noise));
  auto [rng, state] = cuda::draw_rng(h, seed);
  return {launch_site_penalty(h, g_e, g_i, q, kind, rng), state};
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
  if (!ec.defined() && !ic.defined()) return {grad_h.zero_(), grad_g_e, grad_g_i};
  const at::Tensor gc = grad.contiguous();
  const at::Tensor rc = rng.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, hc.scalar_type(), "site_penalty_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        constexpr uintptr_t kAlign = SiteChunk<scalar_t>::kAlign;
        const SiteInputs<scalar_t> in(hc, ec, ic);
        scalar_t* dhp = grad_h.data_ptr<scalar_t>();
        scalar_t* dep = ec.defined() ? grad_g_e.data_ptr<scalar_t>() : nullptr;
        scalar_t* dip = ic.defined() ? grad_g_i.data_ptr<scalar_t>() : nullptr;
        const bool vec =
            in.aligned() && is_aligned(dhp, kAlign) && is_aligned(dep, kAlign) && is_aligned(dip, kAlign);
        launch_backward<scalar_t, acc_t>(gc.const_data_ptr<acc_t>(), in, dhp, dep, dip, n, vec,
                                         noise_params<acc_t>(q, kind), cuda::given_rng(rc), stream);
      });
  return {grad_h, grad_g_e, grad_g_i};
}

}  // namespace

TORCH_LIBRARY_IMPL(dropreg, CUDA, m) {
  m.impl("site_penalty", &site_penalty_cuda);
  m.impl("site_penalty_draw", &site_penalty_draw_cuda);
  m.impl("site_penalty_backward", &site_penalty_backward_cuda);
}

}  // namespace dropreg
