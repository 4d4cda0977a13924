// Site penalty on CUDA (docs/design.md §2, fused op 3).
//
//   site_penalty           out = [Σ (g_e·h)², Σ g_i·η·h]  (2,) acc_t, η regenerated from rng
//                          bytes/elem: read h, g_e, g_i (3·sizeof(T) with both terms).
//   site_penalty_backward  for grad = [a, b] (read on the device):
//                          dh = 2a·g_e²·h + b·g_i·η,  dg_e = 2a·g_e·h²,  dg_i = b·η·h
//                          bytes/elem: read h, g_e, g_i, write dh, dg_e, dg_i (6·sizeof(T)).
// Missing g_e / g_i drop their terms and their loads: which ones are given is a template flag, so
// the loop holds no null checks and a step's loads are all issued before its arithmetic; so is the
// noise kind. η is the site-noise stream of the logical contiguous index of h (site_penalty.h):
// forward and backward see the same η, never stored.
//
// Layout (warp_tile_map.h's SiteRunMap, warp_tile.cuh's accesses): a warp takes the elements in
// runs of 8 steps of 256 (one u16-density Philox call a lane a step), with warp-contiguous 16-byte
// accesses. The dropout kind's words reach the lanes through the warp's table each step; Rademacher
// noise (128 bits a call) takes one call per 128 elements: at the start of a run 16 lanes compute
// its 16 calls into the table, from which each lane reads the word that holds its vector's bits.
//
// The forward reduction is deterministic and independent of the device: the runs are cut into S
// slabs of P runs a warp (8 warps a slab, so >= 8 chunks of 8 elements a thread), S and P functions
// of n only (SlabPlan::of, S <= kMaxSlabs); each thread sums its elements in order (in double), the
// 256 threads are reduced in a fixed tree and the slab writes one partial per term; a second
// kernel, one block, sums the S partials in a fixed tree and rounds once to acc_t. Stage 1's grid
// is one resident wave (from the occupancy calculator) looping over the slabs, so the device only
// decides which block computes which slab, never what it sums. No atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>

#include "cuda_utils.cuh"
#include "dropout.h"
#include "philox.h"
#include "rng.cuh"
#include "site_penalty.h"
#include "site_penalty_host.h"
#include "static_switch.h"
#include "warp_tile.cuh"

namespace dropreg {
namespace {

constexpr int kWarps = SlabPlan::kSlabWarps;          // a block of stage 1 and of the backward
constexpr int kThreads = kWarps * cuda::kWarpSize;
constexpr int kFinalThreads = 256;  // stage 2

using cuda::is_aligned;
using cuda::kFullMask;
using cuda::kWarpSize;

// A step: one u16-density call a lane, 256 elements a warp (SiteRunMap).
template <typename scalar_t>
using SiteTile = cuda::WarpTile<scalar_t, 1>;
constexpr int kRunSteps = SiteRunMap::kRunSteps;
constexpr int64_t kRunElems = SiteRunMap::kRunElems;
static_assert(SiteTile<float>::kElems == SiteRunMap::kStepElems, "a step is a tile of one call a lane");

// What every site-noise kernel needs to regenerate η.
template <typename acc_t>
struct NoiseParams {
  acc_t amplitude;     // sqrt(q/(1-q)) (rademacher) or q'/(1-q') (dropout, q' quantized)
  uint32_t threshold;  // round(q·2^16), dropout noise only
};

// η of the lane's elements (kRad: Rademacher noise, else the dropout kind), a run at a time:
// begin(run) at the start of each run (Rademacher: the run's calls into the table), step() for each
// of its steps in order, end() after the last; every lane of the warp calls each of them.
template <bool kRad, typename scalar_t, typename acc_t>
struct SiteNoise {
  using Tile = SiteTile<scalar_t>;
  const PhiloxStream& philox;
  NoiseParams<acc_t> params;
  cuda::WarpWords<1>& table;
  int lane;

  __device__ __forceinline__ void begin(int64_t run_base) {
    if constexpr (kRad) {
      if (lane < SiteRunMap::kBitCalls) table.put(lane, philox(SiteRunMap::bit_group(run_base / kRunElems, lane)));
      table.sync();
    }
  }

  // η of step s of the run at run_base.
  __device__ __forceinline__ void step(int64_t run_base, int s, acc_t (&eta)[Tile::kVecs][Tile::kV]) {
    if constexpr (kRad) {
#pragma unroll
      for (int q = 0; q < Tile::kVecs; ++q) {
        const int at = SiteRunMap::run_elem(s, Tile::vec_elem(q, lane));
        const uint32_t bits = table.word(SiteRunMap::bit_word(at)) >> SiteRunMap::bit_shift(at);
#pragma unroll
        for (int e = 0; e < Tile::kV; ++e) {
          eta[q][e] = site_noise_value<acc_t>((bits >> e) & 1u, kRademacher, params.amplitude, 0u);
        }
      }
    } else {
      const int64_t step = (run_base + SiteRunMap::run_elem(s, 0)) / Tile::kElems;  // its tile index
      const Philox4 r[1] = {philox(Tile::group(step, 0, lane))};
      uint32_t w[Tile::kVecs][Tile::kVecWords];
      cuda::tile_u16_words<Tile>(r, table, lane, w);
      cuda::for_each_elem<Tile>([&](int q, int e) {
        eta[q][e] = site_noise_value<acc_t>(vec_u16(w[q], e), kDropoutNoise, params.amplitude, params.threshold);
      });
    }
  }

  __device__ __forceinline__ void end() {
    if constexpr (kRad) table.sync();  // the next run's calls overwrite the table
  }
};

// The lane's vectors of h and of the given g_e / g_i at the step at flat index base (all loads
// issued before any arithmetic).
template <bool kFull, bool kHasGe, bool kHasGi, typename Tile, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_site_step(const scalar_t* __restrict__ h, const scalar_t* __restrict__ g_e,
                                               const scalar_t* __restrict__ g_i, int64_t base, int64_t n, int lane,
                                               acc_t (&hx)[Tile::kVecs][Tile::kV],
                                               acc_t (&ex)[Tile::kVecs][Tile::kV],
                                               acc_t (&ix)[Tile::kVecs][Tile::kV]) {
  cuda::load_tile<kFull, Tile>(h, base, n, lane, hx);
  if constexpr (kHasGe) cuda::load_tile<kFull, Tile>(g_e, base, n, lane, ex);
  if constexpr (kHasGi) cuda::load_tile<kFull, Tile>(g_i, base, n, lane, ix);
}

// (a, b) summed over the block in a fixed tree (warp shuffles, then the warps in index order);
// the result is valid in thread 0. Every thread of the block must call it.
template <int kBlockThreads>
__device__ __forceinline__ void block_sum2(double& a, double& b, double* sh /* [2 · kBlockThreads / 32] */) {
  constexpr int kBlockWarps = kBlockThreads / kWarpSize;
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) {
    a += __shfl_down_sync(kFullMask, a, off);
    b += __shfl_down_sync(kFullMask, b, off);
  }
  if (threadIdx.x % kWarpSize == 0) {
    sh[threadIdx.x / kWarpSize] = a;
    sh[kBlockWarps + threadIdx.x / kWarpSize] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    a = 0.0;
    b = 0.0;
#pragma unroll
    for (int w = 0; w < kBlockWarps; ++w) {
      a += sh[w];
      b += sh[kBlockWarps + w];
    }
  }
  __syncthreads();  // sh is reused by the next slab
}

// ---------------------------------------------------------------------------------------------
// site_penalty: stage 1 (per-slab partials) and stage 2 (one block).
// ---------------------------------------------------------------------------------------------

// The terms of one step added to the lane's sums, element by element in order (an element past n
// adds +0, which leaves a sum that starts at +0 unchanged).
template <bool kFull, bool kHasGe, bool kHasGi, bool kRad, typename scalar_t, typename acc_t>
__device__ __forceinline__ void sum_site_step(const scalar_t* __restrict__ h, const scalar_t* __restrict__ g_e,
                                              const scalar_t* __restrict__ g_i, int64_t n, int64_t run_base, int s,
                                              SiteNoise<kRad, scalar_t, acc_t>& noise, double& sum_e,
                                              double& sum_i) {
  using Tile = SiteTile<scalar_t>;
  acc_t hx[Tile::kVecs][Tile::kV], ex[Tile::kVecs][Tile::kV], ix[Tile::kVecs][Tile::kV];
  load_site_step<kFull, kHasGe, kHasGi, Tile>(h, g_e, g_i, run_base + SiteRunMap::run_elem(s, 0), n, noise.lane, hx,
                                                ex, ix);
  if constexpr (kHasGi) {
    acc_t eta[Tile::kVecs][Tile::kV];
    noise.step(run_base, s, eta);
    cuda::for_each_elem<Tile>([&](int q, int e) {
      sum_i += static_cast<double>(site_implicit_term<acc_t>(ix[q][e], eta[q][e], hx[q][e]));
    });
  }
  if constexpr (kHasGe) {
    cuda::for_each_elem<Tile>(
        [&](int q, int e) { sum_e += static_cast<double>(site_explicit_term<acc_t>(ex[q][e], hx[q][e])); });
  }
}

// h, g_e, g_i: (n,) flat contiguous (g_e / g_i only read when kHasGe / kHasGi); vec: all three
// 16-byte aligned. partials: (2, slabs) double: row 0 explicit, row 1 implicit.
template <typename scalar_t, typename acc_t, bool kHasGe, bool kHasGi, bool kRad>
__global__ void __launch_bounds__(kThreads)
    site_penalty_partials_kernel(const scalar_t* __restrict__ h, const scalar_t* __restrict__ g_e,
                                 const scalar_t* __restrict__ g_i, int64_t n, bool vec, SlabPlan plan,
                                 NoiseParams<acc_t> params, const cuda::RngArg rng,
                                 double* __restrict__ partials) {
  using Tile = SiteTile<scalar_t>;
  __shared__ double sh[2 * kWarps];
  __shared__ cuda::WarpWords<1> words[kWarps];
  const cuda::RngState state = cuda::load_rng(rng);
  cuda::store_rng(rng, state);
  const PhiloxStream philox(state.seed, state.offset, kStreamSiteNoise);
  const int warp = threadIdx.x / kWarpSize;
  SiteNoise<kRad, scalar_t, acc_t> noise{philox, params, words[warp], static_cast<int>(threadIdx.x % kWarpSize)};
  // The loop bounds are uniform over each warp (over the block for the slabs): the table's syncs
  // and block_sum2's barriers are reached by every thread they wait for.
  for (int64_t slab = blockIdx.x; slab < plan.slabs; slab += gridDim.x) {
    // Per-element terms are rounded in acc_t, as in the reference; the running sums are double so
    // that a thread's sequential additions lose nothing a float32 tree sum would keep.
    double sum_e = 0.0;
    double sum_i = 0.0;
    const int64_t first_run = plan.first_run(slab, warp);
    for (int64_t r = first_run; r < first_run + plan.runs && r * kRunElems < n; ++r) {
      const int64_t run_base = r * kRunElems;
      noise.begin(run_base);
      for (int s = 0; s < kRunSteps; ++s) {
        if (vec && run_base + SiteRunMap::run_elem(s + 1, 0) <= n) {
          sum_site_step<true, kHasGe, kHasGi>(h, g_e, g_i, n, run_base, s, noise, sum_e, sum_i);
        } else {
          sum_site_step<false, kHasGe, kHasGi>(h, g_e, g_i, n, run_base, s, noise, sum_e, sum_i);
        }
      }
      noise.end();
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

// One step of the backward: dh, dg_e, dg_i of the lane's elements (those below n).
template <bool kFull, bool kHasGe, bool kHasGi, bool kRad, typename scalar_t, typename acc_t>
__device__ __forceinline__ void site_backward_step(acc_t a2, acc_t b, const scalar_t* __restrict__ h,
                                                   const scalar_t* __restrict__ g_e, const scalar_t* __restrict__ g_i,
                                                   scalar_t* __restrict__ dh, scalar_t* __restrict__ dg_e,
                                                   scalar_t* __restrict__ dg_i, int64_t n, int64_t run_base, int s,
                                                   SiteNoise<kRad, scalar_t, acc_t>& noise) {
  using Tile = SiteTile<scalar_t>;
  const int64_t base = run_base + SiteRunMap::run_elem(s, 0);
  acc_t hx[Tile::kVecs][Tile::kV], ex[Tile::kVecs][Tile::kV], ix[Tile::kVecs][Tile::kV];
  acc_t dhx[Tile::kVecs][Tile::kV], dgx[Tile::kVecs][Tile::kV];
  load_site_step<kFull, kHasGe, kHasGi, Tile>(h, g_e, g_i, base, n, noise.lane, hx, ex, ix);
  cuda::for_each_elem<Tile>([&](int q, int e) { dhx[q][e] = acc_t(0); });
  if constexpr (kHasGe) {
    cuda::for_each_elem<Tile>([&](int q, int e) {
      // 0 + term, as the reference's zeros + ...: a -0 term gives +0 there too.
      const SitePartGrad<acc_t> part = site_explicit_grad<acc_t>(a2, ex[q][e], hx[q][e]);
      dhx[q][e] = add_rn(dhx[q][e], part.dh);
      dgx[q][e] = part.dg;
    });
    cuda::store_tile<kFull, Tile>(dg_e, base, n, noise.lane, dgx);
  }
  if constexpr (kHasGi) {
    acc_t eta[Tile::kVecs][Tile::kV];
    noise.step(run_base, s, eta);
    cuda::for_each_elem<Tile>([&](int q, int e) {
      const SitePartGrad<acc_t> part = site_implicit_grad<acc_t>(b, ix[q][e], eta[q][e], hx[q][e]);
      dhx[q][e] = add_rn(dhx[q][e], part.dh);
      dgx[q][e] = part.dg;
    });
    cuda::store_tile<kFull, Tile>(dg_i, base, n, noise.lane, dgx);
  }
  cuda::store_tile<kFull, Tile>(dh, base, n, noise.lane, dhx);
}

// grad: (2,) acc_t [a, b] on the device; h, dh: (n,); g_e, dg_e (kHasGe) and g_i, dg_i (kHasGi):
// (n,); vec: all of them 16-byte aligned. Warp w of the grid takes the runs w, w + warps, ...
template <typename scalar_t, typename acc_t, bool kHasGe, bool kHasGi, bool kRad>
__global__ void __launch_bounds__(kThreads)
    site_penalty_backward_kernel(const acc_t* __restrict__ grad, const scalar_t* __restrict__ h,
                                 const scalar_t* __restrict__ g_e, const scalar_t* __restrict__ g_i,
                                 scalar_t* __restrict__ dh, scalar_t* __restrict__ dg_e,
                                 scalar_t* __restrict__ dg_i, int64_t n, bool vec, NoiseParams<acc_t> params,
                                 const cuda::RngArg rng) {
  using Tile = SiteTile<scalar_t>;
  __shared__ cuda::WarpWords<1> words[kWarps];
  const acc_t a2 = acc_t(2) * grad[0];
  const acc_t b = grad[1];
  const cuda::RngState state = cuda::load_rng(rng);
  const PhiloxStream philox(state.seed, state.offset, kStreamSiteNoise);
  const int warp = threadIdx.x / kWarpSize;
  SiteNoise<kRad, scalar_t, acc_t> noise{philox, params, words[warp], static_cast<int>(threadIdx.x % kWarpSize)};
  const int64_t runs = SiteRunMap::runs(n);
  // Uniform over each warp: the table's syncs are reached by all its lanes.
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + warp; r < runs;
       r += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t run_base = r * kRunElems;
    noise.begin(run_base);
    for (int s = 0; s < kRunSteps; ++s) {
      if (vec && run_base + SiteRunMap::run_elem(s + 1, 0) <= n) {
        site_backward_step<true, kHasGe, kHasGi>(a2, b, h, g_e, g_i, dh, dg_e, dg_i, n, run_base, s, noise);
      } else {
        site_backward_step<false, kHasGe, kHasGi>(a2, b, h, g_e, g_i, dh, dg_e, dg_i, n, run_base, s, noise);
      }
    }
    noise.end();
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
    constexpr uintptr_t kAlign = SiteTile<scalar_t>::kAlign;
    return is_aligned(h, kAlign) && is_aligned(g_e, kAlign) && is_aligned(g_i, kAlign);
  }
};

// The noise parameters in acc_t.
template <typename acc_t>
NoiseParams<acc_t> noise_params(double q, NoiseKind kind) {
  return NoiseParams<acc_t>{static_cast<acc_t>(site_noise_amplitude(q, kind)), dropout_threshold(q)};
}

// Calls launch(kGe, kGi, kRad) with the template flags of the given inputs and noise kind:
// a flag each for g_e and g_i (at least one is given: nothing is instantiated for neither) and the
// kind (only with g_i, the one term with noise).
template <typename Launch>
void site_switch(bool has_ge, bool has_gi, NoiseKind kind, const Launch& launch) {
  BOOL_SWITCH(has_ge, kGe, [&] {
    BOOL_SWITCH(has_gi, kGi, [&] {
      if constexpr (kGi) {
        BOOL_SWITCH(kind == kRademacher, kRad, [&] {
          launch(std::bool_constant<kGe>{}, std::true_type{}, std::bool_constant<kRad>{});
        });
      } else if constexpr (kGe) {
        launch(std::true_type{}, std::false_type{}, std::false_type{});
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Stage 1 of the forward for the given inputs.
template <typename scalar_t, typename acc_t>
void launch_partials(const SiteInputs<scalar_t>& in, int64_t n, bool vec, const SlabPlan& plan, NoiseKind kind,
                     const NoiseParams<acc_t>& noise, const cuda::RngArg& rng, double* partials,
                     cudaStream_t stream) {
  site_switch(in.g_e != nullptr, in.g_i != nullptr, kind, [&](auto ge, auto gi, auto rad) {
    const auto kernel = site_penalty_partials_kernel<scalar_t, acc_t, ge.value, gi.value, rad.value>;
    kernel<<<cuda::grid_size(kernel, plan.slabs, kThreads), kThreads, 0, stream>>>(
        in.h, in.g_e, in.g_i, n, vec, plan, noise, rng, partials);
  });
}

template <typename scalar_t, typename acc_t>
void launch_backward(const acc_t* grad, const SiteInputs<scalar_t>& in, scalar_t* dh, scalar_t* dg_e, scalar_t* dg_i,
                     int64_t n, bool vec, NoiseKind kind, const NoiseParams<acc_t>& noise, const cuda::RngArg& rng,
                     cudaStream_t stream) {
  const int64_t runs = SiteRunMap::runs(n);
  site_switch(in.g_e != nullptr, in.g_i != nullptr, kind, [&](auto ge, auto gi, auto rad) {
    const auto kernel = site_penalty_backward_kernel<scalar_t, acc_t, ge.value, gi.value, rad.value>;
    kernel<<<cuda::grid_size(kernel, (runs + kWarps - 1) / kWarps, kThreads), kThreads, 0, stream>>>(
        grad, in.h, in.g_e, in.g_i, dh, dg_e, dg_i, n, vec, noise, rng);
  });
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
    cuda::write_rng(rng, stream);
    return out.zero_();
  }
  const at::Tensor hc = h.contiguous();
  const at::Tensor ec = contiguous_or_undefined(g_e);
  const at::Tensor ic = contiguous_or_undefined(g_i);
  const SlabPlan plan = SlabPlan::of(n);
  at::Tensor partials = at::empty({2 * plan.slabs}, h.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, hc.scalar_type(), "site_penalty_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const SiteInputs<scalar_t> in(hc, ec, ic);
        launch_partials<scalar_t, acc_t>(in, n, in.aligned(), plan, kind, noise_params<acc_t>(q, kind), rng,
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
  const SiteBackwardIo io = site_backward_io(h, g_e, g_i);
  const at::Tensor& hc = io.h;
  const int64_t n = hc.numel();
  if (n == 0) return {io.grad_h, io.grad_g_e, io.grad_g_i};
  if (!io.g_e.defined() && !io.g_i.defined()) return {io.grad_h.zero_(), io.grad_g_e, io.grad_g_i};
  const at::Tensor gc = grad.contiguous();
  const at::Tensor rc = rng.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, hc.scalar_type(), "site_penalty_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        constexpr uintptr_t kAlign = SiteTile<scalar_t>::kAlign;
        const SiteInputs<scalar_t> in(hc, io.g_e, io.g_i);
        scalar_t* dhp = io.grad_h.data_ptr<scalar_t>();
        scalar_t* dep = io.g_e.defined() ? io.grad_g_e.data_ptr<scalar_t>() : nullptr;
        scalar_t* dip = io.g_i.defined() ? io.grad_g_i.data_ptr<scalar_t>() : nullptr;
        const bool vec =
            in.aligned() && is_aligned(dhp, kAlign) && is_aligned(dep, kAlign) && is_aligned(dip, kAlign);
        launch_backward<scalar_t, acc_t>(gc.const_data_ptr<acc_t>(), in, dhp, dep, dip, n, vec, kind,
                                         noise_params<acc_t>(q, kind), cuda::given_rng(rc), stream);
      });
  return {io.grad_h, io.grad_g_e, io.grad_g_i};
}

}  // namespace

TORCH_LIBRARY_IMPL(dropreg, CUDA, m) {
  m.impl("site_penalty", &site_penalty_cuda);
  m.impl("site_penalty_draw", &site_penalty_draw_cuda);
  m.impl("site_penalty_backward", &site_penalty_backward_cuda);
}

}  // namespace dropreg
