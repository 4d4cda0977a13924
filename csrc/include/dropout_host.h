// Host wrappers of the dropout op shared by the CPU and CUDA launchers: argument checks, the
// contiguous output, and the in-place form. Each backend supplies only `into` (its kernel launch).
#pragma once

#include <ATen/ATen.h>

#include "checks.h"

namespace dropreg {

// Writes the dropout of contiguous x into y (which may be x itself).
using DropoutInto = void (*)(const at::Tensor& x, at::Tensor& y, double p, const at::Tensor& rng);

// x floating, p in [0, 1], rng an int64 [seed, offset] on x's device (checks.cpp).
void check_dropout_args(const at::Tensor& x, double p, const at::Tensor& rng);

// y = dropout(x) in x's memory layout, as torch.empty_like(x) lays it out (dense inputs keep their
// strides; others get a dense tensor in their stride order), with the mask keyed by the logical
// (row-major) element index whatever the layout. A contiguous x is one pass of `into`; any other is
// one pass of `into_strided` where the backend has one (it walks memory order), else it is computed
// in logical order and copied into the layout (two more passes).
inline at::Tensor dropout_out_of_place(const at::Tensor& x, double p, const at::Tensor& rng, DropoutInto into,
                                       DropoutInto into_strided = nullptr) {
  check_dropout_args(x, p, rng);
  at::Tensor y = at::empty_like(x);
  if (x.is_contiguous()) {
    into(x, y, p, rng.contiguous());
    return y;
  }
  if (into_strided != nullptr) {
    into_strided(x, y, p, rng.contiguous());
    return y;
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor yc = at::empty_like(xc, at::MemoryFormat::Contiguous);
  into(xc, yc, p, rng.contiguous());
  return y.copy_(yc);
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
