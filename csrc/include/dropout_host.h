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

// y = dropout(x) as a new contiguous tensor (the mask is keyed by the logical element index).
inline at::Tensor dropout_out_of_place(const at::Tensor& x, double p, const at::Tensor& rng, DropoutInto into) {
  check_dropout_args(x, p, rng);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc, at::MemoryFormat::Contiguous);
  into(xc, y, p, rng.contiguous());
  return y;
}

inline void dropout_in_place(at::Tensor& x, double p, const at::Tensor& rng, DropoutInto into) {
  check_dropout_args(x, p, rng);
  TORCH_CHECK(x.is_contiguous(), "argument 'x' of dropout_ must be contiguous");
  into(x, x, p, rng.contiguous());
}

}  // namespace dropreg
