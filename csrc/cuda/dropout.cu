// Fused dropout on CUDA: Philox mask + scale in one pass, no mask tensor.
// Bytes per element: read x, write y (2·sizeof(T)), the floor of any out-of-place elementwise op.
// Warps take the tensor in tiles of 512 elements (warp_tile.cuh): warp-contiguous 16-byte loads and
// stores, two Philox calls (16 elements) a thread, every load of a tile issued before its Philox
// rounds, in a grid-stride loop over the tiles. (seed, offset) come from device memory or from
// torch's generator's Philox state (rng.cuh), so a launch needs no host sync and is safe to capture
// in a CUDA graph; the round keys are computed once per thread.
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
#include "warp_tile.cuh"

namespace dropreg {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / cuda::kWarpSize;

template <typename scalar_t>
using DropoutTile = cuda::WarpTile<scalar_t, kDropoutTileCalls>;

// The tile at index t: y = m ⊙ x · scale over its elements below n (kFull: all of them, aligned).
template <bool kFull, typename scalar_t, typename acc_t>
__device__ __forceinline__ void dropout_tile(const scalar_t* x, scalar_t* y, int64_t n, uint32_t threshold,
                                             acc_t scale, const PhiloxStream& philox,
                                             cuda::WarpWords<DropoutTile<scalar_t>::kCalls>& table, int lane,
                                             int64_t t) {
  using Tile = DropoutTile<scalar_t>;
  const int64_t base = t * Tile::kElems;
  acc_t v[Tile::kVecs][Tile::kV];
  // The loads first: their latency hides behind the Philox rounds that do not depend on them.
  cuda::load_tile<kFull, Tile>(x, base, n, lane, v);
  Philox4 r[Tile::kCalls];
#pragma unroll
  for (int c = 0; c < Tile::kCalls; ++c) {
    r[c] = philox(Tile::group(t, c, lane));
  }
  uint32_t w[Tile::kVecs][Tile::kVecWords];
  cuda::tile_u16_words<Tile>(r, table, lane, w);
  cuda::for_each_elem<Tile>(
      [&](int q, int e) { v[q][e] = keep(vec_u16(w[q], e), threshold) ? v[q][e] * scale : acc_t(0); });
  cuda::store_tile<kFull, Tile>(y, base, n, lane, v);
}

// kAligned: x and y are 16-byte aligned. Warp w of the grid takes the full tiles w, w + warps, ...,
// then the rest (the last tile, or every tile when unaligned) in the same way.
template <typename scalar_t, typename acc_t, bool kAligned>
__global__ void __launch_bounds__(kThreads)
    dropout_kernel(const scalar_t* x, scalar_t* y, int64_t n, uint32_t threshold, acc_t scale,
                   const cuda::RngArg rng) {
  using Tile = DropoutTile<scalar_t>;
  __shared__ cuda::WarpWords<Tile::kCalls> words[Tile::kOwnCalls ? 1 : kWarps];
  const cuda::RngState state = cuda::load_rng(rng);
  cuda::store_rng(rng, state);
  const PhiloxStream philox(state.seed, state.offset, kStreamDropoutMask);
  const int lane = threadIdx.x % cuda::kWarpSize;
  cuda::WarpWords<Tile::kCalls>& table = words[Tile::kOwnCalls ? 0 : threadIdx.x / cuda::kWarpSize];
  const int64_t tiles = Tile::tiles(n);
  const int64_t full_tiles = kAligned ? Tile::full_tiles(n) : 0;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / cuda::kWarpSize;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  // The loop bounds are uniform over each warp: its lanes reach the table's syncs together.
  for (int64_t t = first; t < full_tiles; t += stride) {
    dropout_tile<true>(x, y, n, threshold, scale, philox, table, lane, t);
  }
  for (int64_t t = full_tiles + first; t < tiles; t += stride) {
    dropout_tile<false>(x, y, n, threshold, scale, philox, table, lane, t);
  }
}

template <typename scalar_t, typename acc_t>
void launch(const scalar_t* x, scalar_t* y, int64_t n, uint32_t threshold, acc_t scale,
            const cuda::RngArg& rng) {
  using Tile = DropoutTile<scalar_t>;
  const int64_t tiles = Tile::tiles(n);
  const bool aligned = cuda::is_aligned(x, Tile::kAlign) && cuda::is_aligned(y, Tile::kAlign);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  BOOL_SWITCH(aligned, kAligned, [&] {
    const auto kernel = dropout_kernel<scalar_t, acc_t, kAligned>;
    const int blocks = cuda::grid_size(kernel, (tiles + kWarps - 1) / kWarps, kThreads);
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
