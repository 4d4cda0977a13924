// The ce_grad kernel: G_rc = row_scale_r · (exp(z_rc - lse_r) - [c == label_r]) over the sample's
// row layout (cross_entropy_common.cuh), each chunk written from its own read: sizeof(T) read +
// sizeof(T) written. cross_entropy.cu launches it.
#pragma once

#include <cstdint>

#include "cross_entropy.h"
#include "cross_entropy_common.cuh"

namespace dropreg {
namespace ce {

template <typename scalar_t, typename acc_t>
struct GradArgs {
  const scalar_t* z;        // (rows, cols) contiguous
  const acc_t* lse;         // (rows,)
  const int64_t* label;     // (rows,)
  const acc_t* row_scale;   // (rows,)
  scalar_t* out;            // (rows, cols)
  int64_t rows;
  int64_t cols;
  int64_t ignore_index;
  RowPlan plan;  // the sample's plan: rows of split rows, no reduction
  bool vec;      // z and out 16-byte aligned
};

// Rows (or splits of rows) as the sample visits them, each chunk written from its own read: the
// row's lse, label and scale are read once, the one-hot is one compare per element.
template <typename scalar_t, typename acc_t, bool kBlockMode>
__global__ void __launch_bounds__(RowLanes<kBlockMode>::kThreads, row_kernel_min_blocks<acc_t, kBlockMode>())
    ce_grad_kernel(const GradArgs<scalar_t, acc_t> a) {
  using C = SampleChunk<scalar_t>;
  using Vec = typename C::Vec;
  constexpr int kElems = C::kElems;
  const RowLanes<kBlockMode> lanes(a.plan);
  const int64_t items = a.rows * a.plan.splits;
  for (int64_t item0 = lanes.first_step(); item0 < items; item0 += lanes.stride()) {
    const int64_t item = lanes.item(item0);
    if (item >= items) break;  // no collective below
    const WorkItem w(item, a.plan.splits);
    const RowParams<acc_t> p = load_row_params<acc_t>(a.lse, a.label, a.row_scale, w.row, a.cols, a.ignore_index);
    const RowChunks<kElems> rc(w, true, a.cols, a.plan.splits, a.vec);
    for (int j = lanes.t; j < rc.n; j += lanes.count) {
      const int64_t base = rc.base(j);
      const bool full = rc.full(j);
      acc_t y[kElems];
      if (p.valid) {
        acc_t x[kElems];
        if (full) {
          Vec v[C::kVecs];
#pragma unroll
          for (int w = 0; w < C::kVecs; ++w) v[w] = reinterpret_cast<const Vec*>(a.z + base)[w];
          unpack<C, acc_t>(v, x);
        } else {
#pragma unroll
          for (int e = 0; e < kElems; ++e) {
            x[e] = base + e >= rc.begin && base + e < rc.end ? static_cast<acc_t>(a.z[base + e]) : acc_t(0);
          }
        }
        const int label_at = place_in_chunk<kElems>(rc.begin + p.label - base);
#pragma unroll
        for (int e = 0; e < kElems; ++e) y[e] = ce_grad_element<acc_t>(x[e], p.lse, e == label_at, p.scale);
      } else {
#pragma unroll
        for (int e = 0; e < kElems; ++e) y[e] = acc_t(0);
      }
      store_chunk_vecs<C, acc_t>(a.out, base, rc.begin, rc.end, full, y);
    }
  }
}

}  // namespace ce
}  // namespace dropreg
