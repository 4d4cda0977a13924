// Per-element math of the site penalty (docs/design.md §2, fused op 3), written once for the CPU
// kernels (cpu/site_penalty*) and the CUDA kernels (cuda/site_penalty.cu). Every formula mirrors
// dropreg_ext/reference.py (site_noise, site_penalty, site_penalty_backward), including the order
// of the floating-point operations. acc_t is float for f16/bf16/f32 inputs and double for f64.
//
// The site-noise stream (kStreamSiteNoise, philox.h layout, i = logical row-major index of h):
//   rademacher: η = +sqrt(q/(1-q)) if bit(i) = 1 else -sqrt(q/(1-q))
//   dropout:    η = q'/(1-q') if u16(i) >= t (kept) else -1  (= m/(1-q') - 1), t = round(q·2^16),
//               q' = t/2^16
#pragma once

#include <cstdint>
#include <type_traits>

#include "dropout.h"
#include "philox.h"

namespace dropreg {

// a + b rounded on its own, never fused with the product before it (nvcc contracts by default; the
// rounding rules: docs/numerics.md).
template <typename acc_t>
DROPREG_HOST_DEVICE acc_t add_rn(acc_t a, acc_t b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<acc_t, float>) {
    return __fadd_rn(a, b);
  } else {
    return __dadd_rn(a, b);
  }
#else
  return a + b;
#endif
}

enum NoiseKind : int {
  kRademacher = 0,
  kDropoutNoise = 1,
};

// The group of element i of the site-noise stream and its draw from that group's words: a bit
// (rademacher, 128 per call) or a u16 (dropout kind, 8 per call).
DROPREG_HOST_DEVICE uint64_t site_noise_group(uint64_t i, int noise_kind) {
  return noise_kind == kRademacher ? i / kBitsPerGroup : i / kU16PerGroup;
}

DROPREG_HOST_DEVICE uint32_t site_noise_draw(const Philox4& r, uint64_t i, int noise_kind) {
  return noise_kind == kRademacher ? group_bit(r, static_cast<int>(i % kBitsPerGroup))
                                   : group_u16(r, static_cast<int>(i % kU16PerGroup));
}

// η for one draw of the site-noise stream. `a` is the positive value, from site_noise_amplitude;
// `threshold` = dropout_threshold(q) (only used by kDropoutNoise). Mean 0 in both cases.
template <typename acc_t>
DROPREG_HOST_DEVICE acc_t site_noise_value(uint32_t draw, int noise_kind, acc_t a, uint32_t threshold) {
  if (noise_kind == kRademacher) return draw != 0u ? a : -a;
  return keep(draw, threshold) ? a : acc_t(-1);
}

// Explicit term (g_e · h)² of one element.
template <typename acc_t>
DROPREG_HOST_DEVICE acc_t site_explicit_term(acc_t g_e, acc_t h) {
  const acc_t t = g_e * h;
  return t * t;
}

// Implicit term g_i · η · h of one element.
template <typename acc_t>
DROPREG_HOST_DEVICE acc_t site_implicit_term(acc_t g_i, acc_t eta, acc_t h) {
  return g_i * eta * h;
}

// Backward of a·Σ(g_e h)² + b·Σ g_i η h for one element, one part at a time (a2 = 2a, precomputed
// once): dh = 2a·g_e²·h + b·g_i·η (a missing input's part omitted), dg_e = 2a·g_e·h², dg_i = b·η·h.
template <typename acc_t>
struct SitePartGrad {
  acc_t dh;  // the part's term of dh
  acc_t dg;  // the gradient of the part's g (dg_e or dg_i)
};

template <typename acc_t>
DROPREG_HOST_DEVICE SitePartGrad<acc_t> site_explicit_grad(acc_t a2, acc_t g_e, acc_t h) {
  return {a2 * g_e * g_e * h, a2 * g_e * h * h};
}

template <typename acc_t>
DROPREG_HOST_DEVICE SitePartGrad<acc_t> site_implicit_grad(acc_t b, acc_t g_i, acc_t eta, acc_t h) {
  return {b * g_i * eta, b * eta * h};
}

}  // namespace dropreg
