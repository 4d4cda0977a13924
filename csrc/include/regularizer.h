// Per-element math of the regularizer ops (docs/design.md §2, fused ops 2 and 3), written once for the
// C++ CPU kernels (cpu/*.cpp) and the CUDA kernels (cuda/cross_entropy.cu, cuda/site_penalty.cu).
// Every formula below mirrors dropreg_ext/reference.py, including the order of the floating-point
// operations where that order is visible, so the backends agree with the reference to rounding.
// acc_t is float for f16/bf16/f32 inputs and double for f64 inputs (at::opmath_type).
//
// Random streams (philox.h layout, i = logical row-major element index of the tensor):
//   Gumbel     (kStreamGumbel, u32 of i = r·C + c of z):  u = ((u32 >> 9) + 1/2)·2^-23,  G = -log(-log u)
//   site noise (kStreamSiteNoise, i of h):
//     rademacher: η = +sqrt(q/(1-q)) if bit(i) = 1 else -sqrt(q/(1-q))
//     dropout:    η = q'/(1-q') if u16(i) >= t (kept) else -1  (= m/(1-q') - 1), t = round(q·2^16),
//                 q' = t/2^16
#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "dropout.h"
#include "philox.h"

namespace dropreg {

// ---------------------------------------------------------------------------------------------
// exp / log in acc_t. Accurate libm versions on both sides (never __expf/__logf): the Gumbel
// argmax and the loss are compared against the reference, so the fast intrinsics' error matters.
// ---------------------------------------------------------------------------------------------

DROPREG_HOST_DEVICE float acc_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}

DROPREG_HOST_DEVICE double acc_exp(double x) {
#if defined(__CUDA_ARCH__)
  return exp(x);
#else
  return std::exp(x);
#endif
}

DROPREG_HOST_DEVICE float acc_log(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return std::log(x);
#endif
}

DROPREG_HOST_DEVICE double acc_log(double x) {
#if defined(__CUDA_ARCH__)
  return log(x);
#else
  return std::log(x);
#endif
}

// a + b rounded on its own: nvcc contracts x·y + c into one FMA by default, which would round
// dh = 2a·g_e²·h + b·g_i·η differently from the reference's separate multiply and add.
DROPREG_HOST_DEVICE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

DROPREG_HOST_DEVICE double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// ---------------------------------------------------------------------------------------------
// Gumbel noise (reference.gumbel_noise), always float32 whatever the logits' dtype.
// ---------------------------------------------------------------------------------------------

// u = ((u32 >> 9) + 1/2) · 2^-23: the top 23 bits centred in their cell, so u ∈ [2^-24, 1 - 2^-24]
// lies strictly inside (0, 1) and every step is exact in float32 (no log(0), no rounding to 1).
DROPREG_HOST_DEVICE float uniform_open01(uint32_t u) {
  return (static_cast<float>(u >> 9) + 0.5f) * 1.1920928955078125e-07f;  // 2^-23
}

// Standard Gumbel G = -log(-log u); finite, in [-2.8, 16.6] for the u above.
DROPREG_HOST_DEVICE float gumbel_from_uint32(uint32_t u) {
  return -acc_log(-acc_log(uniform_open01(u)));
}

// ---------------------------------------------------------------------------------------------
// Online log-sum-exp and Gumbel-max argmax: the two associative states of the one-pass
// cross-entropy (merge order fixed by the caller, so results are deterministic).
// ---------------------------------------------------------------------------------------------

// (m, s) stands for Σ exp(x) = s · exp(m). Empty state: (-inf, 0).
template <typename acc_t>
struct LseState {
  acc_t m;
  acc_t s;
};

template <typename acc_t>
DROPREG_HOST_DEVICE LseState<acc_t> lse_identity() {
  return {-std::numeric_limits<acc_t>::infinity(), acc_t(0)};
}

// m = max(m1, m2), s = s1·exp(m1 - m) + s2·exp(m2 - m), written as hi.s + lo.s·exp(lo.m - hi.m)
// so that the larger side is never scaled: exp(+inf - +inf) would be NaN. Equal maxima are added
// directly, which covers (-inf, -inf) and (+inf, +inf). A NaN maximum reaches s through
// exp(NaN), so the final lse is NaN, as torch.logsumexp gives. merge(a, b) and merge(b, a) pick
// the same hi / lo and so agree bit for bit.
template <typename acc_t>
DROPREG_HOST_DEVICE LseState<acc_t> lse_merge(LseState<acc_t> a, LseState<acc_t> b) {
  if (a.m == b.m) return {a.m, a.s + b.s};
  const bool a_is_max = a.m > b.m;
  const LseState<acc_t> hi = a_is_max ? a : b;
  const LseState<acc_t> lo = a_is_max ? b : a;
  return {hi.m, hi.s + lo.s * acc_exp(lo.m - hi.m)};
}

// Adds one element x: merge with (x, 1); one exp per element.
template <typename acc_t>
DROPREG_HOST_DEVICE LseState<acc_t> lse_add(LseState<acc_t> a, acc_t x) {
  return lse_merge<acc_t>(a, LseState<acc_t>{x, acc_t(1)});
}

// log Σ exp(x) = m + log s (-inf for an all -inf row, +inf if any +inf, NaN if any NaN).
template <typename acc_t>
DROPREG_HOST_DEVICE acc_t lse_value(LseState<acc_t> a) {
  return a.m + acc_log(a.s);
}

// Running argmax of score = z + G. Empty state: (-inf, INT64_MAX), which loses to every element.
template <typename acc_t>
struct ArgmaxState {
  acc_t score;
  int64_t index;
};

template <typename acc_t>
DROPREG_HOST_DEVICE ArgmaxState<acc_t> argmax_identity() {
  return {-std::numeric_limits<acc_t>::infinity(), std::numeric_limits<int64_t>::max()};
}

// torch.argmax semantics: NaN beats every number (the first NaN wins), otherwise the larger score
// wins and ties go to the smaller index. A total order, so any merge order gives the same winner.
template <typename acc_t>
DROPREG_HOST_DEVICE ArgmaxState<acc_t> argmax_merge(ArgmaxState<acc_t> a, ArgmaxState<acc_t> b) {
  const bool a_nan = a.score != a.score;
  const bool b_nan = b.score != b.score;
  bool take_a;
  if (a_nan || b_nan) {
    take_a = a_nan && (!b_nan || a.index < b.index);
  } else {
    take_a = a.score > b.score || (a.score == b.score && a.index < b.index);
  }
  return take_a ? a : b;
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy gradient and its VJP (reference.ce_grad / ce_grad_backward), per element.
// ---------------------------------------------------------------------------------------------

// p = softmax(z)_c = exp(z - lse).
template <typename acc_t>
DROPREG_HOST_DEVICE acc_t softmax_prob(acc_t z, acc_t lse) {
  return acc_exp(z - lse);
}

// G = (p - [c == label]) · row_scale, for a valid row.
template <typename acc_t>
DROPREG_HOST_DEVICE acc_t ce_grad_element(acc_t z, acc_t lse, bool is_label, acc_t row_scale) {
  return (softmax_prob<acc_t>(z, lse) - (is_label ? acc_t(1) : acc_t(0))) * row_scale;
}

// grad_z = row_scale · p · (u - ⟨p, u⟩), for a valid row (pu = ⟨p, u⟩ of the row).
template <typename acc_t>
DROPREG_HOST_DEVICE acc_t ce_grad_backward_element(acc_t p, acc_t u, acc_t pu, acc_t row_scale) {
  return row_scale * p * (u - pu);
}

// ---------------------------------------------------------------------------------------------
// Site noise and site penalty (reference.site_noise / site_penalty / site_penalty_backward).
// ---------------------------------------------------------------------------------------------

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

// Backward of a·Σ(g_e h)² + b·Σ g_i η h for one element (a2 = 2a, precomputed once):
//   dh   = 2a·g_e²·h + b·g_i·η   (either part omitted when its input is missing)
//   dg_e = 2a·g_e·h²
//   dg_i = b·η·h
template <typename acc_t>
DROPREG_HOST_DEVICE acc_t site_dh_explicit(acc_t a2, acc_t g_e, acc_t h) {
  return a2 * g_e * g_e * h;
}

template <typename acc_t>
DROPREG_HOST_DEVICE acc_t site_dh_implicit(acc_t b, acc_t g_i, acc_t eta) {
  return b * g_i * eta;
}

template <typename acc_t>
DROPREG_HOST_DEVICE acc_t site_dg_explicit(acc_t a2, acc_t g_e, acc_t h) {
  return a2 * g_e * h * h;
}

template <typename acc_t>
DROPREG_HOST_DEVICE acc_t site_dg_implicit(acc_t b, acc_t eta, acc_t h) {
  return b * eta * h;
}

// ---------------------------------------------------------------------------------------------
// Host-only argument checks (defined in checks.cpp: never compiled for the device).
// ---------------------------------------------------------------------------------------------

// "rademacher" -> kRademacher, "dropout" -> kDropoutNoise; anything else is a user error.
NoiseKind parse_noise(const std::string& noise);

// The site-noise drop probability: q = 1 would make q/(1-q) infinite.
void check_noise_prob(double q);

// The positive noise value `a` of site_noise_value, in double (cast once to acc_t by the caller),
// as reference.site_noise_amplitude: pow(·, 0.5) rather than sqrt mirrors Python's `** 0.5` bit
// for bit; the dropout kind's t / (2^16 - t) is q'/(1-q') for the quantized q' = t / 2^16.
inline double site_noise_amplitude(double q, NoiseKind kind) {
  if (kind == kRademacher) return std::pow(q / (1.0 - q), 0.5);
  const uint32_t t = dropout_threshold(q);
  return static_cast<double>(t) / static_cast<double>(65536u - t);
}

}  // namespace dropreg
