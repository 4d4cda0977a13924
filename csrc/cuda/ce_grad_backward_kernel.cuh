// The ce_grad_backward kernel: for the cotangent u of G = ce_grad(z, lse, label, row_scale),
//   grad_z = row_scale · p ⊙ (u - ⟨p, u⟩),  grad_row_scale = ⟨p, u⟩ - u[label],  p = exp(z - lse),
// over the rows of its own plan (cross_entropy_common.cuh; never split). z and u are read once
// and kept in shared memory for the second pass when the row fits (2·sizeof(T) read + sizeof(T)
// written), else read twice (4·sizeof(T) read; the second read hits L2 for short rows).
// cross_entropy.cu launches it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "cross_entropy.h"
#include "cross_entropy_common.cuh"
#include "cuda_utils.cuh"

namespace dropreg {
namespace ce {

// Σ v over the row's lanes, returned to every lane (bit-identical everywhere: the xor butterfly
// adds the same pairs on each lane, and each thread sums the warp partials in index order). In
// block mode every thread of the block must call it.
template <typename acc_t, bool kBlockMode>
__device__ __forceinline__ acc_t row_sum(acc_t v, int lanes, acc_t* sh /* [kRowWarps] */) {
  const int width = kBlockMode ? kWarpSize : lanes;
  for (int off = width / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  if constexpr (kBlockMode) {
    if (threadIdx.x % kWarpSize == 0) sh[threadIdx.x / kWarpSize] = v;
    __syncthreads();
    acc_t total = acc_t(0);
#pragma unroll
    for (int w = 0; w < kRowWarps; ++w) total += sh[w];
    __syncthreads();  // sh is reused by the next row
    v = total;
  }
  return v;
}

template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  const scalar_t* u;        // (rows, cols) contiguous
  const scalar_t* z;        // (rows, cols) contiguous
  const acc_t* lse;         // (rows,)
  const int64_t* label;     // (rows,)
  const acc_t* row_scale;   // (rows,)
  scalar_t* grad_z;         // (rows, cols)
  acc_t* grad_row_scale;    // (rows,)
  int64_t rows;
  int64_t cols;
  int64_t ignore_index;
  RowPlan plan;
  bool vec;      // u, z and grad_z 16-byte aligned
  bool on_chip;  // z and u kept in shared memory between the passes
};

// This thread's chunk `it` of z and u (flat index base) as acc_t, read as whole 16-byte vectors:
// from the stash when `from_stash`, else from global memory, kept in the stash when `to_stash`.
// Pass 1 reads its full chunks so; pass 2 its full ones, and its edge ones too when on_chip.
template <int kThreads, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_zu_vecs(const BackwardArgs<scalar_t, acc_t>& a,
                                             typename BackwardChunk<scalar_t>::Vec* stash_z,
                                             typename BackwardChunk<scalar_t>::Vec* stash_u, int it, int64_t base,
                                             bool from_stash, bool to_stash,
                                             acc_t (&zx)[BackwardChunk<scalar_t>::kElems],
                                             acc_t (&ux)[BackwardChunk<scalar_t>::kElems]) {
  using C = BackwardChunk<scalar_t>;
  using Vec = typename C::Vec;
  Vec zv[C::kVecs], uv[C::kVecs];
#pragma unroll
  for (int w = 0; w < C::kVecs; ++w) {
    zv[w] = from_stash ? *stash_slot<C, kThreads>(stash_z, it, w) : reinterpret_cast<const Vec*>(a.z + base)[w];
    uv[w] = from_stash ? *stash_slot<C, kThreads>(stash_u, it, w) : reinterpret_cast<const Vec*>(a.u + base)[w];
  }
  if (to_stash) {
#pragma unroll
    for (int w = 0; w < C::kVecs; ++w) {
      *stash_slot<C, kThreads>(stash_z, it, w) = zv[w];
      *stash_slot<C, kThreads>(stash_u, it, w) = uv[w];
    }
  }
  unpack<C, acc_t>(zv, zx);
  unpack<C, acc_t>(uv, ux);
}

// Pass 1 reads z and u (keeping them in shared memory when on_chip) for ⟨p, u⟩; pass 2 writes
// grad_z from shared memory or a second read. The two passes do the same arithmetic either way.
template <typename scalar_t, typename acc_t, bool kBlockMode>
__global__ void __launch_bounds__(RowLanes<kBlockMode>::kThreads, row_kernel_min_blocks<acc_t, kBlockMode>())
    ce_grad_backward_kernel(const BackwardArgs<scalar_t, acc_t> a) {
  using C = BackwardChunk<scalar_t>;
  constexpr int kThreads = RowLanes<kBlockMode>::kThreads;
  constexpr int kElems = C::kElems;
  __shared__ acc_t sh[kRowWarps];
  auto* const stash_z = thread_stash<C>();  // this thread's chunks of z ...
  auto* const stash_u = stash_z + a.plan.iters * C::kVecs * kThreads;  // ... and of u
  const RowLanes<kBlockMode> lanes(a.plan);

  // Uniform loop bound, and `valid` is uniform over a row's lanes: row_sum's barriers and shuffles
  // are reached by every thread.
  for (int64_t row0 = lanes.first_step(); row0 < a.rows; row0 += lanes.stride()) {
    const int64_t row = lanes.item(row0);
    const bool row_ok = row < a.rows;
    const RowParams<acc_t> p = row_ok ? load_row_params<acc_t>(a.lse, a.label, a.row_scale, row, a.cols,
                                                               a.ignore_index)
                                      : RowParams<acc_t>{acc_t(0), acc_t(0), 0, false};
    const int64_t begin = row * a.cols;
    const int64_t end = begin + a.cols;
    // The row's chunks are first + j, j in [0, n); the full ones j in [full_lo, full_hi): RowChunks
    // of an unsplit row, written out because its general form (splits, clamps) costs this kernel's
    // loops 1 to 3 instructions per element in nvcc 13.0's code.
    const int64_t first = begin / kElems;
    const int n = row_ok ? static_cast<int>((end - 1) / kElems - first + 1) : 0;
    const int full_lo = static_cast<int>((begin + kElems - 1) / kElems - first);
    const int full_hi = a.vec ? static_cast<int>(std::max<int64_t>(full_lo, end / kElems - first)) : full_lo;

    // Pass 1: ⟨p, u⟩ of the row. An edge chunk's elements outside the row read as z = -inf,
    // u = 0: they add p·u = 0 (or NaN where the row's own elements do, lse = -inf or NaN), so the
    // chunk needs no mask.
    const scalar_t kNegInf = static_cast<scalar_t>(-std::numeric_limits<float>::infinity());
    acc_t pu_part = acc_t(0);
    if (p.valid) {
      for (int it = 0, j = lanes.t; it < a.plan.iters && j < n; ++it, j += lanes.count) {
        const int64_t base = (first + j) * kElems;
        acc_t zx[kElems], ux[kElems];
        if (j >= full_lo && j < full_hi) {
          load_zu_vecs<kThreads>(a, stash_z, stash_u, it, base, /*from_stash=*/false, /*to_stash=*/a.on_chip, zx, ux);
        } else {
#pragma unroll
          for (int e = 0; e < kElems; ++e) {
            const bool in_row = base + e >= begin && base + e < end;
            const scalar_t zr = in_row ? a.z[base + e] : kNegInf;
            const scalar_t ur = in_row ? a.u[base + e] : scalar_t();
            if (a.on_chip) {
              stash_slot<C, kThreads>(stash_z, it, e / C::kV)->v[e % C::kV] = zr;
              stash_slot<C, kThreads>(stash_u, it, e / C::kV)->v[e % C::kV] = ur;
            }
            zx[e] = static_cast<acc_t>(zr);
            ux[e] = static_cast<acc_t>(ur);
          }
        }
#pragma unroll
        for (int e = 0; e < kElems; ++e) pu_part += softmax_prob<acc_t>(zx[e], p.lse) * ux[e];
      }
    }
    const acc_t pu = row_sum<acc_t, kBlockMode>(pu_part, lanes.count, sh);

    // Pass 2: grad_z = row_scale · p · (u - ⟨p, u⟩), 0 on ignored rows; an edge chunk stores its
    // row's elements only.
    for (int it = 0, j = lanes.t; it < a.plan.iters && j < n; ++it, j += lanes.count) {
      const int64_t base = (first + j) * kElems;
      const bool full = j >= full_lo && j < full_hi;
      acc_t y[kElems];
      if (p.valid) {
        acc_t zx[kElems], ux[kElems];
        if (a.on_chip || full) {
          load_zu_vecs<kThreads>(a, stash_z, stash_u, it, base, /*from_stash=*/a.on_chip, /*to_stash=*/false, zx, ux);
        } else {
          // Elements outside the row read as 0 and are never stored. Pass 1's loop (raw values kept
          // for the stash) would serve here too, but costs the Half block-mode kernel a register in
          // nvcc 13.0's code.
#pragma unroll
          for (int e = 0; e < kElems; ++e) {
            const bool in_row = base + e >= begin && base + e < end;
            zx[e] = in_row ? static_cast<acc_t>(a.z[base + e]) : acc_t(0);
            ux[e] = in_row ? static_cast<acc_t>(a.u[base + e]) : acc_t(0);
          }
        }
#pragma unroll
        for (int e = 0; e < kElems; ++e) {
          y[e] = ce_grad_backward_element<acc_t>(softmax_prob<acc_t>(zx[e], p.lse), ux[e], pu, p.scale);
        }
      } else {
#pragma unroll
        for (int e = 0; e < kElems; ++e) y[e] = acc_t(0);
      }
      store_chunk_vecs<C, acc_t>(a.grad_z, base, begin, end, full, y);
    }
    if (row_ok && lanes.t == 0) {
      // p.label was asserted to be in [0, cols); NaN rather than an out-of-bounds read otherwise.
      const bool in_range = p.label >= 0 && p.label < a.cols;
      const acc_t u_label =
          in_range ? static_cast<acc_t>(a.u[begin + p.label]) : std::numeric_limits<acc_t>::quiet_NaN();
      a.grad_row_scale[row] = p.valid ? pu - u_label : acc_t(0);
    }
  }
}

}  // namespace ce
}  // namespace dropreg
