// Per-element dropout math, shared by the CPU and CUDA kernels (contract v2, reference.py).
//
//   y_i = keep_i ? x_i * scale : +0,   keep_i = u16(i) >= t,   t = round(p * 2^16) in [0, 2^16],
//   scale = 2^16 / (2^16 - t) = 1/(1 - p') for the quantized p' = t / 2^16  (0 when t = 2^16),
// computed in acc_t (float for f16/bf16/f32, double for f64) and rounded once to the output dtype
// (the rounding and NaN rules of every backend: docs/numerics.md).
// Dropout is linear in x with the same mask, so the backward (and every higher derivative) is the
// same function applied to the incoming gradient: the mask is regenerated, never stored.
#pragma once

#include <cmath>
#include <cstdint>

#include "philox.h"

namespace dropreg {

// round-half-to-even of p * 2^16, the same rule as Python's round() in reference.py.
inline uint32_t dropout_threshold(double p) { return static_cast<uint32_t>(std::nearbyint(p * 65536.0)); }

template <typename acc_t>
inline acc_t dropout_scale(double p) {
  const uint32_t t = dropout_threshold(p);
  return t >= 65536u ? acc_t(0) : static_cast<acc_t>(65536.0 / static_cast<double>(65536u - t));
}

template <typename scalar_t, typename acc_t>
DROPREG_HOST_DEVICE scalar_t dropout_element(scalar_t x, uint32_t u16, uint32_t threshold, acc_t scale) {
  return keep(u16, threshold) ? static_cast<scalar_t>(static_cast<acc_t>(x) * scale) : static_cast<scalar_t>(0);
}

}  // namespace dropreg
