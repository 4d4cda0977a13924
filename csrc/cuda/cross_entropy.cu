// Cross-entropy with a sampled label on CUDA (docs/design.md §2, fused op 2): three kernels.
//
//   cross_entropy_sample  one read pass over each row of z (N, C):
//                           lse_r = log Σ_c exp(z_rc)              (online max / sum-exp)
//                           ŷ_r   = argmax_c (z_rc + G_rc)    (Gumbel-max, G: kStreamGumbel)
//                           loss_r = lse_r - z_r[target_r]
//                         bytes/elem: sizeof(T) read (z), nothing written per element. The ALU
//                         work (Philox per 4 elements, two logf, one expf) dominates unless the
//                         Gumbel bound below skips the draw: elements more than 17 below the
//                         thread's running best score cannot win and are never drawn.
//   ce_grad               G_rc = row_scale_r · (exp(z_rc - lse_r) - [c == label_r]), elementwise;
//                         bytes/elem: sizeof(T) read + sizeof(T) written.
//   ce_grad_backward      grad_z = row_scale · p ⊙ (u - ⟨p, u⟩),
//                         grad_row_scale = ⟨p, u⟩ - u[label];
//                         two passes per row (⟨p, u⟩, then the write): bytes/elem 4·sizeof(T) read
//                         (z and u twice; the second read hits L2 only for short rows) +
//                         sizeof(T) written.
//
// Row kernels (cross_entropy_sample, ce_grad_backward) put one warp on a row when C <= 1024 (8
// rows per 256-thread block, warp-shuffle reductions only) and a 512-thread block on a row
// otherwise; rows are visited in a grid-stride loop over a grid of at most one resident wave.
// Nothing holds a whole row on chip, so C is bounded only by int64 indexing.
//
// Elements are handled in chunks of kElems = 4·kGroups consecutive *flat* indices i = r·C + c,
// aligned to multiples of kElems: one chunk is one (float, bf16/f16: 16 B; double: 32 B) vector
// load when it lies inside the row and z is aligned, and its Gumbel draws are exactly kGroups
// Philox calls (groups i >> 2). A row that starts or ends inside a chunk takes those edge chunks
// element by element (the alignment shift of Apex's xentropy, for free).
//
// Reductions use a fixed tree (warp xor-shuffles, then the warps in index order) chosen by C
// only, so every result is deterministic. (seed, offset) are read from device memory; invalid
// targets trip a device assert, as in PyTorch's nll_loss: no host sync anywhere.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "cross_entropy_host.h"
#include "cuda_utils.cuh"
#include "philox.h"
#include "regularizer.h"
#include "static_switch.h"

namespace dropreg {
namespace {

// Warp mode: one warp per row, kWarpBlockThreads / 32 rows per block.
constexpr int kWarpBlockThreads = 256;
// Block mode: one block of kRowBlockThreads threads per row.
constexpr int kRowBlockThreads = 512;
// Rows up to this many classes take warp mode (at most 9 chunks, i.e. 36 floats or 72 halves, per
// lane); longer rows get a whole block so that a few rows still fill the GPU.
constexpr int64_t kWarpModeMaxCols = 1024;
// Elementwise kernel (ce_grad).
constexpr int kElementwiseThreads = 256;

// Upper bound on every Gumbel value: the largest u gives G = -log(-log(1 - 2^-24)) = 16.64; the
// margin covers the last-ulp error of logf. An element with z + kGumbelBound < best score cannot
// win the argmax (rounding is monotonic, so fl(z + G) <= fl(z + kGumbelBound) < best), so its
// Philox draw and two logs are skipped without changing ŷ.
constexpr float kGumbelBound = 17.0f;

using cuda::ChunkShape;
using cuda::grid_size;
using cuda::is_aligned;
using cuda::kFullMask;
using cuda::kWarpSize;
using cuda::load_chunk;
using cuda::load_row_chunk;
using cuda::store_chunk;
using cuda::store_row_chunk;

// ---------------------------------------------------------------------------------------------
// Reductions over the kRowThreads threads of a row (a warp, or the whole block).
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
__device__ __forceinline__ void warp_reduce_ce(LseState<acc_t>& l, ArgmaxState<acc_t>& g) {
  // xor butterfly: lse_merge is symmetric and argmax_merge a total order, so every lane ends
  // with the same (bit-identical) result.
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) {
    const LseState<acc_t> lo{__shfl_xor_sync(kFullMask, l.m, off),
                             __shfl_xor_sync(kFullMask, l.s, off)};
    const ArgmaxState<acc_t> go{
        __shfl_xor_sync(kFullMask, g.score, off),
        static_cast<int64_t>(__shfl_xor_sync(kFullMask, static_cast<long long>(g.index), off))};
    l = lse_merge<acc_t>(l, lo);
    g = argmax_merge<acc_t>(g, go);
  }
}

// Result valid in thread 0 of the row. In block mode every thread of the block must call it.
template <typename acc_t, int kRowThreads>
__device__ __forceinline__ void row_reduce_ce(LseState<acc_t>& l, ArgmaxState<acc_t>& g) {
  warp_reduce_ce<acc_t>(l, g);
  if constexpr (kRowThreads > kWarpSize) {
    constexpr int kWarps = kRowThreads / kWarpSize;
    __shared__ LseState<acc_t> sh_l[kWarps];
    __shared__ ArgmaxState<acc_t> sh_g[kWarps];
    const int lane = threadIdx.x % kWarpSize;
    const int warp = threadIdx.x / kWarpSize;
    if (lane == 0) {
      sh_l[warp] = l;
      sh_g[warp] = g;
    }
    __syncthreads();
    if (warp == 0) {
      l = lane < kWarps ? sh_l[lane] : lse_identity<acc_t>();
      g = lane < kWarps ? sh_g[lane] : argmax_identity<acc_t>();
      warp_reduce_ce<acc_t>(l, g);
    }
    __syncthreads();  // sh_l / sh_g are reused by the next row
  }
}

// Σ v over the row's threads, returned to every thread of the row (bit-identical everywhere:
// the xor butterfly adds the same pairs on each lane, and each thread sums the warp partials in
// the same index order). In block mode every thread of the block must call it.
template <typename acc_t, int kRowThreads>
__device__ __forceinline__ acc_t row_sum(acc_t v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  if constexpr (kRowThreads > kWarpSize) {
    constexpr int kWarps = kRowThreads / kWarpSize;
    __shared__ acc_t sh[kWarps];
    if (threadIdx.x % kWarpSize == 0) sh[threadIdx.x / kWarpSize] = v;
    __syncthreads();
    acc_t total = acc_t(0);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += sh[w];
    __syncthreads();  // sh is reused by the next row
    v = total;
  }
  return v;
}

// ---------------------------------------------------------------------------------------------
// cross_entropy_sample
// ---------------------------------------------------------------------------------------------

// z: (rows, cols) contiguous; target: (rows,); rng: [seed, offset];
// loss, lse: (rows,) acc_t; yhat: (rows,) int64.
template <typename scalar_t, typename acc_t, int kRowThreads, int kBlockThreads, bool kAligned>
__global__ void __launch_bounds__(kBlockThreads)
    cross_entropy_sample_kernel(const scalar_t* __restrict__ z, const int64_t* __restrict__ target,
                                const int64_t* __restrict__ rng, acc_t* __restrict__ loss,
                                acc_t* __restrict__ lse, int64_t* __restrict__ yhat, int64_t rows,
                                int64_t cols, int64_t ignore_index) {
  static_assert(kRowThreads == kWarpSize || kRowThreads == kBlockThreads,
                "a row is handled by one warp or by the whole block");
  constexpr int kGroups = ChunkShape<scalar_t>::kGroups;
  constexpr int kElems = ChunkShape<scalar_t>::kElems;
  constexpr int kRowsPerBlock = kBlockThreads / kRowThreads;
  const uint64_t seed = static_cast<uint64_t>(rng[0]);
  const uint64_t offset = static_cast<uint64_t>(rng[1]);
  const int t = threadIdx.x % kRowThreads;
  const acc_t bound = static_cast<acc_t>(kGumbelBound);

  // The loop bound is uniform over the block, so block mode's __syncthreads are never divergent;
  // in warp mode a warp whose row is past the end just idles (warp mode has no block barrier).
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock; row0 < rows;
       row0 += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t row = row0 + threadIdx.x / kRowThreads;
    if (row >= rows) continue;
    const int64_t tgt = target[row];
    const bool valid = tgt != ignore_index;  // ignored rows need lse but no sample
    const int64_t begin = row * cols;
    const int64_t end = begin + cols;
    LseState<acc_t> l = lse_identity<acc_t>();
    ArgmaxState<acc_t> g = argmax_identity<acc_t>();
    for (int64_t k = begin / kElems + t; k <= (end - 1) / kElems; k += kRowThreads) {
      const int64_t base = k * kElems;
      acc_t x[kElems];
      bool in_row[kElems];
      load_row_chunk<scalar_t, acc_t, kElems, kAligned>(z, base, begin, end, x, in_row);
#pragma unroll
      for (int e = 0; e < kElems; ++e) {
        if (in_row[e]) l = lse_add<acc_t>(l, x[e]);
      }
      if (!valid) continue;
#pragma unroll
      for (int gi = 0; gi < kGroups; ++gi) {
        // Draw this group only if one of its elements can still win (see kGumbelBound); the
        // per-element test below uses the newer, larger best score, so it never needs a word
        // this test skipped.
        bool need = false;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int e = 4 * gi + j;
          need = need || (in_row[e] && !(x[e] + bound < g.score));
        }
        if (!need) continue;
        const Philox4 r =
            philox_group(seed, offset, kStreamGumbel, static_cast<uint64_t>(k) * kGroups + gi);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int e = 4 * gi + j;
          if (in_row[e] && !(x[e] + bound < g.score)) {
            const acc_t score = x[e] + static_cast<acc_t>(gumbel_from_uint32(r.x[j]));
            g = argmax_merge<acc_t>(g, ArgmaxState<acc_t>{score, base + e - begin});
          }
        }
      }
    }
    row_reduce_ce<acc_t, kRowThreads>(l, g);
    if (t == 0) {
      const acc_t row_lse = lse_value<acc_t>(l);
      lse[row] = row_lse;
      if (valid) {
        const bool in_range = tgt >= 0 && tgt < cols;
        CUDA_KERNEL_ASSERT(in_range && "cross_entropy_sample: target out of bounds");
        const acc_t z_target = in_range ? static_cast<acc_t>(z[begin + tgt])
                                        : std::numeric_limits<acc_t>::quiet_NaN();
        loss[row] = row_lse - z_target;
        yhat[row] = g.index;
      } else {
        loss[row] = acc_t(0);
        yhat[row] = ignore_index;
      }
    }
  }
}

template <typename scalar_t, typename acc_t, int kRowThreads, int kBlockThreads>
void launch_cross_entropy_sample(const scalar_t* z, const int64_t* target, const int64_t* rng,
                                 acc_t* loss, acc_t* lse, int64_t* yhat, int64_t rows,
                                 int64_t cols, int64_t ignore_index, cudaStream_t stream) {
  constexpr int kRowsPerBlock = kBlockThreads / kRowThreads;
  BOOL_SWITCH(is_aligned(z, ChunkShape<scalar_t>::kAlign), kAligned, [&] {
    const auto kernel = cross_entropy_sample_kernel<scalar_t, acc_t, kRowThreads, kBlockThreads, kAligned>;
    const int blocks = grid_size(kernel, (rows + kRowsPerBlock - 1) / kRowsPerBlock, kBlockThreads);
    kernel<<<blocks, kBlockThreads, 0, stream>>>(z, target, rng, loss, lse, yhat, rows, cols, ignore_index);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// ce_grad
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
struct RowParams {
  acc_t lse;
  acc_t scale;
  int64_t label;
  bool valid;
};

template <typename acc_t>
__device__ __forceinline__ RowParams<acc_t> load_row_params(
    const acc_t* __restrict__ lse, const int64_t* __restrict__ label,
    const acc_t* __restrict__ row_scale, int64_t row, int64_t cols, int64_t ignore_index) {
  RowParams<acc_t> p;
  p.label = label[row];
  p.valid = p.label != ignore_index;
  CUDA_KERNEL_ASSERT((!p.valid || (p.label >= 0 && p.label < cols)) &&
                     "label out of bounds");
  p.lse = lse[row];
  p.scale = row_scale[row];
  return p;
}

// z, out: (n = rows·cols,) flat contiguous; lse, row_scale: (rows,) acc_t; label: (rows,).
// Each thread takes whole chunks of flat indices; the row of the first element costs one int64
// division per chunk, and a chunk that crosses rows (short rows) steps to the next row inline.
template <typename scalar_t, typename acc_t, bool kAligned>
__global__ void __launch_bounds__(kElementwiseThreads)
    ce_grad_kernel(const scalar_t* __restrict__ z, const acc_t* __restrict__ lse,
                   const int64_t* __restrict__ label, const acc_t* __restrict__ row_scale,
                   scalar_t* __restrict__ out, int64_t n, int64_t cols, int64_t ignore_index) {
  constexpr int kElems = ChunkShape<scalar_t>::kElems;
  const int64_t chunks = (n + kElems - 1) / kElems;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kElementwiseThreads;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kElementwiseThreads + threadIdx.x;
       k < chunks; k += stride) {
    const int64_t base = k * kElems;
    acc_t x[kElems];
    load_chunk<scalar_t, acc_t, kElems, kAligned>(z, base, n, x);
    int64_t row = base / cols;
    int64_t col = base - row * cols;
    RowParams<acc_t> p = load_row_params<acc_t>(lse, label, row_scale, row, cols, ignore_index);
    acc_t y[kElems];
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      y[e] = p.valid ? ce_grad_element<acc_t>(x[e], p.lse, col == p.label, p.scale) : acc_t(0);
      if (++col == cols && base + e + 1 < n) {  // next element starts the next row
        col = 0;
        ++row;
        p = load_row_params<acc_t>(lse, label, row_scale, row, cols, ignore_index);
      }
    }
    store_chunk<scalar_t, acc_t, kElems, kAligned>(out, base, n, y);
  }
}

// ---------------------------------------------------------------------------------------------
// ce_grad_backward
// ---------------------------------------------------------------------------------------------

// u, z, grad_z: (rows, cols) contiguous; lse, row_scale, grad_row_scale: (rows,) acc_t;
// label: (rows,).
template <typename scalar_t, typename acc_t, int kRowThreads, int kBlockThreads, bool kAligned>
__global__ void __launch_bounds__(kBlockThreads)
    ce_grad_backward_kernel(const scalar_t* __restrict__ u, const scalar_t* __restrict__ z,
                            const acc_t* __restrict__ lse, const int64_t* __restrict__ label,
                            const acc_t* __restrict__ row_scale, scalar_t* __restrict__ grad_z,
                            acc_t* __restrict__ grad_row_scale, int64_t rows, int64_t cols,
                            int64_t ignore_index) {
  static_assert(kRowThreads == kWarpSize || kRowThreads == kBlockThreads,
                "a row is handled by one warp or by the whole block");
  constexpr int kElems = ChunkShape<scalar_t>::kElems;
  constexpr int kRowsPerBlock = kBlockThreads / kRowThreads;
  const int t = threadIdx.x % kRowThreads;

  // Uniform loop bound, and `valid` is uniform over a row's threads: row_sum's barriers in block
  // mode are reached by the whole block or by none of it.
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock; row0 < rows;
       row0 += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t row = row0 + threadIdx.x / kRowThreads;
    if (row >= rows) continue;
    const int64_t begin = row * cols;
    const int64_t end = begin + cols;
    const int64_t first = begin / kElems + t;
    const int64_t last = (end - 1) / kElems;
    const RowParams<acc_t> p =
        load_row_params<acc_t>(lse, label, row_scale, row, cols, ignore_index);
    if (!p.valid) {
      const acc_t zeros[kElems] = {};
      for (int64_t k = first; k <= last; k += kRowThreads) {
        store_row_chunk<scalar_t, acc_t, kElems, kAligned>(grad_z, k * kElems, begin, end, zeros);
      }
      if (t == 0) grad_row_scale[row] = acc_t(0);
      continue;
    }

    // Pass 1: ⟨p, u⟩ of the row.
    acc_t pu_part = acc_t(0);
    for (int64_t k = first; k <= last; k += kRowThreads) {
      acc_t zx[kElems], ux[kElems];
      bool in_row[kElems];
      load_row_chunk<scalar_t, acc_t, kElems, kAligned>(z, k * kElems, begin, end, zx, in_row);
      load_row_chunk<scalar_t, acc_t, kElems, kAligned>(u, k * kElems, begin, end, ux, in_row);
#pragma unroll
      for (int e = 0; e < kElems; ++e) {
        if (in_row[e]) pu_part += softmax_prob<acc_t>(zx[e], p.lse) * ux[e];
      }
    }
    const acc_t pu = row_sum<acc_t, kRowThreads>(pu_part);

    // Pass 2: grad_z = row_scale · p · (u - ⟨p, u⟩).
    for (int64_t k = first; k <= last; k += kRowThreads) {
      acc_t zx[kElems], ux[kElems], y[kElems];
      bool in_row[kElems];
      load_row_chunk<scalar_t, acc_t, kElems, kAligned>(z, k * kElems, begin, end, zx, in_row);
      load_row_chunk<scalar_t, acc_t, kElems, kAligned>(u, k * kElems, begin, end, ux, in_row);
#pragma unroll
      for (int e = 0; e < kElems; ++e) {
        y[e] = ce_grad_backward_element<acc_t>(softmax_prob<acc_t>(zx[e], p.lse), ux[e], pu,
                                               p.scale);
      }
      store_row_chunk<scalar_t, acc_t, kElems, kAligned>(grad_z, k * kElems, begin, end, y);
    }
    if (t == 0) {
      // p.label was asserted to be in [0, cols); NaN rather than an out-of-bounds read otherwise.
      const bool in_range = p.label >= 0 && p.label < cols;
      const acc_t u_label = in_range ? static_cast<acc_t>(u[begin + p.label])
                                     : std::numeric_limits<acc_t>::quiet_NaN();
      grad_row_scale[row] = pu - u_label;
    }
  }
}

template <typename scalar_t, typename acc_t, int kRowThreads, int kBlockThreads>
void launch_ce_grad_backward(const scalar_t* u, const scalar_t* z, const acc_t* lse,
                             const int64_t* label, const acc_t* row_scale, scalar_t* grad_z,
                             acc_t* grad_row_scale, int64_t rows, int64_t cols,
                             int64_t ignore_index, cudaStream_t stream) {
  constexpr int kRowsPerBlock = kBlockThreads / kRowThreads;
  constexpr uintptr_t kAlign = ChunkShape<scalar_t>::kAlign;
  const bool aligned = is_aligned(u, kAlign) && is_aligned(z, kAlign) && is_aligned(grad_z, kAlign);
  BOOL_SWITCH(aligned, kAligned, [&] {
    const auto kernel = ce_grad_backward_kernel<scalar_t, acc_t, kRowThreads, kBlockThreads, kAligned>;
    const int blocks = grid_size(kernel, (rows + kRowsPerBlock - 1) / kRowsPerBlock, kBlockThreads);
    kernel<<<blocks, kBlockThreads, 0, stream>>>(u, z, lse, label, row_scale, grad_z, grad_row_scale, rows, cols,
                                                 ignore_index);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// Host side: argument checks, allocation, dispatch.
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_sample_cuda(const at::Tensor& z,
                                                                         const at::Tensor& target,
                                                                         const at::Tensor& rng,
                                                                         int64_t ignore_index) {
  check_cross_entropy_sample_args(z, target, rng);
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t rows = z.size(0);
  const int64_t cols = z.size(1);
  at::Tensor loss = at::empty({rows}, z.options().dtype(acc_type(z)));
  at::Tensor lse = at::empty({rows}, z.options().dtype(acc_type(z)));
  at::Tensor yhat = at::empty({rows}, z.options().dtype(at::kLong));
  if (rows == 0) return {loss, lse, yhat};
  const at::Tensor zc = z.contiguous();
  const at::Tensor tc = target.contiguous();
  const at::Tensor rc = rng.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, zc.scalar_type(), "cross_entropy_sample_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto launch = [&](auto kernel_launcher) {
          kernel_launcher(zc.const_data_ptr<scalar_t>(), tc.const_data_ptr<int64_t>(),
                          rc.const_data_ptr<int64_t>(), loss.data_ptr<acc_t>(),
                          lse.data_ptr<acc_t>(), yhat.data_ptr<int64_t>(), rows, cols,
                          ignore_index, stream);
        };
        if (cols <= kWarpModeMaxCols) {
          launch(launch_cross_entropy_sample<scalar_t, acc_t, kWarpSize, kWarpBlockThreads>);
        } else {
          launch(launch_cross_entropy_sample<scalar_t, acc_t, kRowBlockThreads, kRowBlockThreads>);
        }
      });
  return {loss, lse, yhat};
}

at::Tensor ce_grad_cuda(const at::Tensor& z, const at::Tensor& lse, const at::Tensor& label,
                        const at::Tensor& row_scale, int64_t ignore_index) {
  check_ce_grad_args(z, lse, label, row_scale);
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor zc = z.contiguous();
  at::Tensor out = at::empty_like(zc, at::MemoryFormat::Contiguous);
  const int64_t n = zc.numel();
  if (n == 0) return out;
  const at::Tensor lc = lse.contiguous();
  const at::Tensor yc = label.contiguous();
  const at::Tensor sc = row_scale.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zc.scalar_type(), "ce_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kElems = ChunkShape<scalar_t>::kElems;
    constexpr uintptr_t kAlign = ChunkShape<scalar_t>::kAlign;
    const int64_t chunks = (n + kElems - 1) / kElems;
    const scalar_t* zp = zc.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    BOOL_SWITCH(is_aligned(zp, kAlign) && is_aligned(op, kAlign), kAligned, [&] {
      const auto kernel = ce_grad_kernel<scalar_t, acc_t, kAligned>;
      const int blocks =
          grid_size(kernel, (chunks + kElementwiseThreads - 1) / kElementwiseThreads, kElementwiseThreads);
      kernel<<<blocks, kElementwiseThreads, 0, stream>>>(zp, lc.const_data_ptr<acc_t>(), yc.const_data_ptr<int64_t>(),
                                                         sc.const_data_ptr<acc_t>(), op, n, zc.size(1), ignore_index);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> ce_grad_backward_cuda(const at::Tensor& u, const at::Tensor& z,
                                                         const at::Tensor& lse,
                                                         const at::Tensor& label,
                                                         const at::Tensor& row_scale,
                                                         int64_t ignore_index) {
  check_ce_grad_args(z, lse, label, row_scale);
  check_cotangent(u, z);
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor zc = z.contiguous();
  const at::Tensor uc = u.contiguous();
  at::Tensor grad_z = at::empty_like(zc, at::MemoryFormat::Contiguous);
  at::Tensor grad_row_scale = at::empty_like(row_scale, at::MemoryFormat::Contiguous);
  const int64_t rows = zc.size(0);
  const int64_t cols = zc.size(1);
  if (rows == 0) return {grad_z, grad_row_scale};
  const at::Tensor lc = lse.contiguous();
  const at::Tensor yc = label.contiguous();
  const at::Tensor sc = row_scale.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, zc.scalar_type(), "ce_grad_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto launch = [&](auto kernel_launcher) {
          kernel_launcher(uc.const_data_ptr<scalar_t>(), zc.const_data_ptr<scalar_t>(),
                          lc.const_data_ptr<acc_t>(), yc.const_data_ptr<int64_t>(),
                          sc.const_data_ptr<acc_t>(), grad_z.data_ptr<scalar_t>(),
                          grad_row_scale.data_ptr<acc_t>(), rows, cols, ignore_index, stream);
        };
        if (cols <= kWarpModeMaxCols) {
          launch(launch_ce_grad_backward<scalar_t, acc_t, kWarpSize, kWarpBlockThreads>);
        } else {
          launch(launch_ce_grad_backward<scalar_t, acc_t, kRowBlockThreads, kRowBlockThreads>);
        }
      });
  return {grad_z, grad_row_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(dropreg, CUDA, m) {
  m.impl("cross_entropy_sample", &cross_entropy_sample_cuda);
  m.impl("ce_grad", &ce_grad_cuda);
  m.impl("ce_grad_backward", &ce_grad_backward_cuda);
}

}  // namespace dropreg
