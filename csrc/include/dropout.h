// Per-element dropout math, shared by the CPU and CUDA kernels.
//
//   y_i = keep_i ? x_i * scale : 0,   keep_i = u32(i) >= threshold,
//   threshold = round(p * 2^32),      scale = 1 / (1 - p)  (0 when p = 1),
// computed in acc_t (float for f16/bf16/f32, double for f64) and rounded once to the output dtype.
// Dropout is linear in x with the same mask, so the backward (and every higher derivative) is the
// same function applied to the incoming gradient: the mask is regenerated, never stored.
#pragma once

#include <cmath>
#include <cstdint>

#include "philox.h"

namespace dropreg {

// round-half-to-even of p * 2^32, the same rule as Python's round() in reference.py.
inline uint64_t dropout_threshold(double p) {
  return static_cast<uint64_t>(std::nearbyint(p * 4294967296.0));
}

template <typename acc_t>
inline acc_t dropout_scale(double p) {
  return p >= 1.0 ? acc_t(0) : static_cast<acc_t>(1.0 / (1.0 - p));
}

template <typename scalar_t, typename acc_t>
DROPREG_HOST_DEVICE scalar_t dropout_element(scalar_t x, uint32_t u, uint64_t threshold,
                                             acc_t scale) {
  return keep(u, threshold) ? static_cast<scalar_t>(static_cast<acc_t>(x) * scale)
                            : static_cast<scalar_t>(0);
}

}  // namespace dropreg
