// Host wrappers of the dropout op shared by the CPU and CUDA launchers: argument checks, the
// contiguous output, and the in-place form. Each backend supplies only `into` (its kernel launch).
#pragma once

#include <ATen/ATen.h>

#include "checks.h"

namespace dropreg {

// Writes the dropout of contiguous x into y (which may be x itself).
using DropoutInto = void (*)(const at::Tensor& x, at::Tensor& y, double p, const at::Tensor& rng);

inline void check_dropout_args(const at::Tensor& x, double p, const at::Tensor& rng) {
  DROPREG_CHECK_FLOATING(x);
  DROPREG_CHECK_PROB(p);
  DROPREG_CHECK_RNG(rng, x);
}

// y = dropout(x) in x's memory layout, as torch.empty_like(x) lays it out (dense inputs keep their
// strides; others get a dense tensor in their stride order), with the mask keyed by the logical
// (row-major) element index whatever the layout. A contiguous x is one pass; any other is computed
// in logical order and copied into the layout (two more passes: a tiled kernel that walks memory
// order is the open lever).
inline at::Tensor dropout_out_of_place(const at::Tensor& x, double p, const at::Tensor& rng, DropoutInto into) {
  check_dropout_args(x, p, rng);
  at::Tensor y = at::empty_like(x);
  if (x.is_contiguous()) {
    into(x, y, p, rng.contiguous());
    return y;
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor yc = at::empty_like(xc, at::MemoryFormat::Contiguous);
  into(xc, yc, p, rng.contiguous());
  return y.copy_(yc);
}

inline void dropout_in_place(at::Tensor& x, double p, const at::Tensor& rng, DropoutInto into) {
  check_dropout_args(x, p, rng);
  TORCH_CHECK(x.is_contiguous(), "argument 'x' of dropout_ must be contiguous");
  into(x, x, p, rng.contiguous());
}

}  // namespace dropreg
