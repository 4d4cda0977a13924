// Per-element math of the cross-entropy ops (docs/design.md §2, fused op 2), written once for the
// CPU kernels (cpu/cross_entropy*) and the CUDA kernels (cuda/cross_entropy.cu). Every formula
// mirrors dropreg_ext/reference.py, including the order of the floating-point operations where
// that order is visible. acc_t is float for f16/bf16/f32 logits and double for f64 (at::opmath_type).
//
// The Gumbel streams (contract v3, philox.h layout; docs/numerics.md "The Gumbel stream,
// contract v3") at the element i = r·C + c of z:
//   h = u16(i) of kStreamGumbel (8 elements a Philox call), v = u32(i) of kStreamGumbelRefine,
//   u = (k + 1/2)·2^-23 with k = (h << 7) | (v >> 25),  G = -log(-log u).
// h alone decides the candidate filter; the kernels draw v for the candidates only.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "philox.h"

namespace dropreg {

// exp / log in acc_t by their libm names on the host and the device alike (never the fast
// __expf / __logf: the Gumbel argmax and the loss are compared against the reference, so the fast
// intrinsics' error matters).
DROPREG_HOST_DEVICE float acc_exp(float x) { return expf(x); }
DROPREG_HOST_DEVICE double acc_exp(double x) { return exp(x); }
DROPREG_HOST_DEVICE float acc_log(float x) { return logf(x); }
DROPREG_HOST_DEVICE double acc_log(double x) { return log(x); }

// ---------------------------------------------------------------------------------------------
// Gumbel noise (reference.gumbel_noise), always float32 whatever the logits' dtype.
// ---------------------------------------------------------------------------------------------

// u = (k + 1/2)·2^-23, k = (h << 7) | (v >> 25): the midpoint of one of the 2^23 cells of (0, 1),
// so u ∈ [2^-24, 1 - 2^-24] lies strictly inside (0, 1) and every step is exact in float32 (no
// log(0), no rounding to 1).
DROPREG_HOST_DEVICE float gumbel_uniform(uint32_t h, uint32_t v) {
  return (static_cast<float>((h << 7) | (v >> 25)) + 0.5f) * 1.1920928955078125e-07f;  // 2^-23
}

// Standard Gumbel G = -log(-log u); finite, in [-2.8, 16.6] for the u above.
DROPREG_HOST_DEVICE float gumbel(uint32_t h, uint32_t v) { return -acc_log(-acc_log(gumbel_uniform(h, v))); }

// The candidate filter's view of 1 - u, from h alone: k <= (h << 7) + 127, so
//   1 - u >= (w + 1/2)·2^-23,  w = 2^23 - 1 - ((h << 7) + 127) = (2^16 - 1 - h)·2^7,
// the smallest 1 - u that any refinement v can give (exact: w < 2^23). A filter that passes every
// element with (w + 1/2)·2^-23 < e·bound passes every element that v2's test on the whole u would.
DROPREG_HOST_DEVICE uint32_t gumbel_filter_w(uint32_t h) { return (0xFFFFu - h) << 7; }

// Word w & 3 of a call and u16 e & 7 of a call (philox.h's group_u16) by selects, not r.x[i]: a
// dynamic index would put r in a GPU thread's local memory.
DROPREG_HOST_DEVICE uint32_t select_word(const Philox4& r, uint64_t w) {
  return (w & 2) != 0 ? ((w & 1) != 0 ? r.x[3] : r.x[2]) : ((w & 1) != 0 ? r.x[1] : r.x[0]);
}
DROPREG_HOST_DEVICE uint32_t select_u16(const Philox4& r, uint64_t e) {
  return (select_word(r, e >> 1) >> ((e & 1) * 16)) & 0xFFFFu;
}

// The two Gumbel streams of one call (seed, offset): one key schedule, each stream's counter
// words 2-3. filter(g) is call g of the filter bits; refinement(i) is v of element i, word i & 3
// of call i >> 2 of the refinement stream (one Philox call, paid by a candidate).
struct GumbelStreams {
  PhiloxStream filter;
  uint32_t refine_c2;
  uint32_t refine_c3;

  DROPREG_HOST_DEVICE GumbelStreams(uint64_t seed, uint64_t offset)
      : filter(seed, offset, kStreamGumbel),
        refine_c2(static_cast<uint32_t>(offset + kStreamGumbelRefine)),
        refine_c3(static_cast<uint32_t>((offset + kStreamGumbelRefine) >> 32)) {}

  DROPREG_HOST_DEVICE uint32_t refinement(uint64_t i) const {
    const uint64_t g = i >> 2;
    const Philox4 r =
        philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), refine_c2, refine_c3, filter.key);
    return select_word(r, i);
  }
};

// ---------------------------------------------------------------------------------------------
// The states of the one-pass cross-entropy: log-sum-exp and Gumbel-max argmax (merge order fixed
// by the caller, so results are deterministic).
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

// The fused op's grad_z = p · (w - ⟨p, w⟩) + grad_loss · (p - [c == label]), for a valid row (w the
// combined cotangent of G, pw = ⟨p, w⟩ of the row).
template <typename acc_t>
DROPREG_HOST_DEVICE acc_t sample_grad_backward_element(acc_t p, acc_t w, acc_t pw, acc_t grad_loss, bool is_label) {
  return p * (w - pw) + grad_loss * (p - (is_label ? acc_t(1) : acc_t(0)));
}

}  // namespace dropreg
