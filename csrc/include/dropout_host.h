// Host wrappers of the dropout op shared by the CPU and CUDA launchers: argument checks, the
// contiguous output, and the in-place form. Each backend supplies only `into` (its kernel launch).
#pragma once

#include <ATen/ATen.h>

#include "checks.h"
#include "dropout_indexed.h"

namespace dropreg {

// Writes the dropout of contiguous x into y (which may be x itself).
using DropoutInto = void (*)(const at::Tensor& x, at::Tensor& y, double p, const at::Tensor& rng);

// x floating, p in [0, 1], rng an int64 [seed, offset] on x's device (checks.cpp).
void check_dropout_args(const at::Tensor& x, double p, const at::Tensor& rng);

// The draw ops' arguments: x floating, p in [0, 1] (checks.cpp).
void check_dropout_draw_args(const at::Tensor& x, double p);

// dropout_indexed's index: one stride per dim of x, base >= 0, strides >= 0, every index < 2^63.
void check_dropout_index(const at::Tensor& x, c10::IntArrayRef index_strides, int64_t index_base);

// The IndexMap of a contiguous tensor of x's shape: size-1 dims dropped, neighbours merged where the
// index runs on (the outer dim's stride is the inner one's times its size).
inline IndexMap make_index_map(const at::Tensor& x, c10::IntArrayRef index_strides, int64_t index_base) {
  IndexMap map;
  map.base = static_cast<uint64_t>(index_base);
  for (int64_t d = 0; d < x.dim(); ++d) {
    const int64_t size = x.size(d);
    if (size == 1) continue;
    if (map.dims > 0 && map.strides[map.dims - 1] == index_strides[d] * size) {
      map.sizes[map.dims - 1] *= size;
      map.strides[map.dims - 1] = index_strides[d];
      continue;
    }
    TORCH_CHECK(map.dims < kMaxIndexDims, "argument 'index_strides': dropout_indexed supports at most ",
                kMaxIndexDims, " dims that do not merge, got ", index_strides);
    map.sizes[map.dims] = size;
    map.strides[map.dims] = index_strides[d];
    ++map.dims;
  }
  return map;
}

// y = kernel(x) in x's memory layout for a kernel `into(xc, yc)` on contiguous tensors: one pass for
// a contiguous x, else x made contiguous and the result copied into y's layout (two more passes).
template <typename Into>
at::Tensor into_layout_of(const at::Tensor& x, const Into& into) {
  at::Tensor y = at::empty_like(x);
  if (x.is_contiguous()) {
    into(x, y);
    return y;
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor yc = at::empty_like(xc, at::MemoryFormat::Contiguous);
  into(xc, yc);
  return y.copy_(yc);
}

// y = dropout(x) in x's memory layout, as torch.empty_like(x) lays it out (dense inputs keep their
// strides; others get a dense tensor in their stride order), with the mask keyed by the logical
// (row-major) element index whatever the layout. A contiguous x is one pass of `into`; any other is
// one pass of `into_strided` where the backend has one (it walks memory order), else
// into_layout_of's two more passes.
inline at::Tensor dropout_out_of_place(const at::Tensor& x, double p, const at::Tensor& rng, DropoutInto into,
                                       DropoutInto into_strided = nullptr) {
  check_dropout_args(x, p, rng);
  const at::Tensor state = rng.contiguous();
  if (into_strided != nullptr && !x.is_contiguous()) {
    at::Tensor y = at::empty_like(x);
    into_strided(x, y, p, state);
    return y;
  }
  return into_layout_of(x, [&](const at::Tensor& xc, at::Tensor& yc) { into(xc, yc, p, state); });
}

// The same, written into x: contiguous, or any dense layout where the backend walks memory order.
inline void dropout_in_place(at::Tensor& x, double p, const at::Tensor& rng, DropoutInto into,
                             DropoutInto into_strided = nullptr) {
  check_dropout_args(x, p, rng);
  if (x.is_contiguous()) {
    into(x, x, p, rng.contiguous());
    return;
  }
  TORCH_CHECK(into_strided != nullptr && x.is_non_overlapping_and_dense(),
              "argument 'x' of dropout_ must be contiguous (or dense, on the CPU)");
  into_strided(x, x, p, rng.contiguous());
}

}  // namespace dropreg
