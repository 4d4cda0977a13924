// AVX2 inner loops of the CPU cross-entropy kernels (cross_entropy.cpp), for float accumulation
// on CPUs with AVX2 + FMA + F16C and no AVX-512: each the AVX-512 loop of cross_entropy_avx512.h at
// 8 logits a register, the same arithmetic in the same order (the 16 partial sums: elements
// 8j..8j+7 go to partials 0..7 for even j, 8..15 for odd), the sample pass with the Philox draws
// of philox16 (philox_simd.h). The sample pass's exp is the AVX-512 one's polynomial; below -87.3
// (where exp is subnormal) it gives 0: those elements add nothing the lse can see and cannot win
// the Gumbel-max (that needs z > S - 16.6). The gradients' exp is SLEEF's 8-lane one.
#pragma once

#include <immintrin.h>

#include <limits>
#include <type_traits>

#include "blocks.h"
#include "cross_entropy_row.h"
#include "exp_log.h"
#include "isa.h"
#include "load_store_simd.h"
#include "philox_simd.h"

namespace dropreg {
namespace cpu {

// exp(x) for x <= 0: exp_nonpositive_avx512 at half the width (its ISA twin): x = n·ln2 + r, e^r by
// its degree-7 Taylor polynomial, 2^n built in the exponent bits (AVX2 has no scalef), so
// x < -87.3, -inf and NaN give 0.
DROPREG_AVX2 inline __m256 exp_nonpositive_avx2(__m256 x) {
  const __m256 normal = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_GE_OQ);  // false for NaN
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860676533018704e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(bits)), normal);
}

// The lanes of register j (elements 8j .. 8j + 7 of a block) whose offsets lie in [lo, hi), as bits.
inline int in_row_lanes(int64_t lo, int64_t hi, int j) {
  int bits = 0;
  for (int k = 0; k < 8; ++k) bits |= (8 * j + k >= lo && 8 * j + k < hi) << k;
  return bits;
}

// sample_block_avx2 after its draws, over the registers j0 .. j1 - 1 that [lo, hi) touches (kFull:
// all 16, unrolled, the logits in registers); sum[j & 1] keeps the partials of the full block's
// order. A skipped register's lanes are outside the row: they would add exact zeros. The ISA twin
// of sample_registers_avx512: AVX2 has no mask registers, so the row's edges are padded with -inf
// and its lanes kept as bits.
template <bool kFull, typename scalar_t>
DROPREG_AVX2 __attribute__((always_inline)) inline int64_t sample_registers_avx2(
    const scalar_t* z, int64_t lo, int64_t hi, RowState<float>& st, float* e_out, const uint16_t* h, int32_t* cand) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const int j0 = kFull ? 0 : static_cast<int>(lo / 8);
  const int j1 = kFull ? 16 : static_cast<int>((hi + 7) / 8);
  // A row's first and last blocks: the row's logits as floats, -inf around them.
  alignas(32) float padded[kBlockElems];
  if (!kFull) {
    for (int64_t k = 8 * j0; k < 8 * j1; ++k) padded[k] = k >= lo && k < hi ? static_cast<float>(z[k]) : -kInf;
  }
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 x[16];
  __m256 mx = _mm256_set1_ps(-kInf);
  int bad = 0;
  for (int j = j0; j < j1; ++j) {
    _mm_prefetch(reinterpret_cast<const char*>(z + 8 * j) + kPrefetchBytes, _MM_HINT_T0);
    x[j] = kFull ? load8<scalar_t>(z + 8 * j) : _mm256_load_ps(padded + 8 * j);
    mx = _mm256_max_ps(x[j], mx);  // vmaxps returns its second operand when either is NaN
    // |x| >= inf or NaN; the padding's -inf is not the row's
    const int lanes_bad = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_and_ps(x[j], abs_mask), _mm256_set1_ps(kInf),
                                                           _CMP_NLT_UQ));
    bad |= kFull ? lanes_bad : lanes_bad & in_row_lanes(lo, hi, j);
  }
  if (bad != 0) {
    st.nonfinite = true;
    for (int j = j0; j < j1; ++j) st.nan |= _mm256_movemask_ps(_mm256_cmp_ps(x[j], x[j], _CMP_UNORD_Q)) != 0;
  }
  alignas(32) float lane_max[8];
  _mm256_store_ps(lane_max, mx);
  float block_max = lane_max[0];
  for (int k = 1; k < 8; ++k) block_max = lane_max[k] > block_max ? lane_max[k] : block_max;
  if (block_max > st.m) st.raise_max(block_max);
  const bool add = st.m > -kInf;  // while m = -inf every value so far is -inf and adds 0
  const bool exact = st.nonfinite || !(st.bound < kInf);
  const __m256 mv = _mm256_set1_ps(st.m);
  // The filter on the integers, as the AVX-512 block: w = gumbel_filter_w(h) < fma(e, bound·2^23, -1/2).
  const __m256 big_b = _mm256_set1_ps(st.bound * 8388608.0f);
  const __m256 minus_half = _mm256_set1_ps(-0.5f);
  const __m256i all16 = _mm256_set1_epi32(0xFFFF);
  __m256 sum[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t count = 0;
  for (int j = j0; j < j1; ++j) {
    const __m256 e = exp_nonpositive_avx2(_mm256_sub_ps(x[j], mv));  // the padding's -inf gives 0
    sum[j & 1] = _mm256_add_ps(sum[j & 1], e);
    int pass = kFull ? 0xFF : in_row_lanes(lo, hi, j);
    if (e_out != nullptr) {
      if (kFull) {
        _mm256_storeu_ps(e_out + 8 * j, e);
      } else {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, e);
        for (int k = 0; k < 8; ++k) {
          if (pass >> k & 1) e_out[8 * j + k] = tmp[k];
        }
      }
    }
    if (!exact) {
      const __m256i hj = _mm256_cvtepu16_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(h + 8 * j)));
      const __m256 w = _mm256_cvtepi32_ps(_mm256_slli_epi32(_mm256_xor_si256(hj, all16), 7));
      pass &= _mm256_movemask_ps(_mm256_cmp_ps(w, _mm256_fmadd_ps(e, big_b, minus_half), _CMP_LT_OQ));
    }
    for (; pass != 0; pass &= pass - 1) cand[count++] = static_cast<int32_t>(8 * j + __builtin_ctz(pass));
  }
  if (add) {
    for (int k = 0; k < 2; ++k) {
      double* part = st.partial + 8 * k;
      const __m256d lo_sum = _mm256_add_pd(_mm256_load_pd(part), _mm256_cvtps_pd(_mm256_castps256_ps128(sum[k])));
      const __m256d hi_sum = _mm256_add_pd(_mm256_load_pd(part + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(sum[k], 1)));
      _mm256_store_pd(part, lo_sum);
      _mm256_store_pd(part + 4, hi_sum);
    }
  }
  return count;
}

// One 128-element block of the sample pass: sample_block_avx512's contract (z points at flat
// index blk, [lo, hi) the offsets that belong to the row, e_out nullable, h[0..128) the filter
// bits, candidates into cand), 8 logits a register; the filter bits of the calls [lo, hi) touches
// (philox16: 8 calls when they lie in one half of the block, else 16).
template <typename scalar_t>
DROPREG_AVX2 int64_t sample_block_avx2(const scalar_t* z, int64_t lo, int64_t hi, RowState<float>& st, uint64_t seed,
                                       uint64_t stream, uint64_t first_call, float* e_out, uint16_t* h,
                                       int32_t* cand) {
  {
    __m256i d[8];
    const bool high_half = lo >= kBlockElems / 2;
    if (hi <= kBlockElems / 2 || high_half) {
      philox16<1>(seed, stream, first_call + (high_half ? 8 : 0), d);
      for (int j = 0; j < 4; ++j) _mm256_store_si256(reinterpret_cast<__m256i*>(h + (high_half ? 64 : 0) + 16 * j), d[j]);
    } else {
      philox16<2>(seed, stream, first_call, d);
      for (int j = 0; j < 8; ++j) _mm256_store_si256(reinterpret_cast<__m256i*>(h + 16 * j), d[j]);
    }
  }
  if (lo == 0 && hi == kBlockElems) return sample_registers_avx2<true>(z, lo, hi, st, e_out, h, cand);
  return sample_registers_avx2<false>(z, lo, hi, st, e_out, h, cand);
}

// scale_block_avx512's contract (g[k] = (e[k]·f - [k == y])·s for the offsets [lo, hi), the
// values of a finite row), 8 a register; a row's first and last blocks element by element.
template <typename scalar_t>
DROPREG_AVX2 void scale_block_avx2(const float* e, int64_t lo, int64_t hi, float f, int64_t y, float s, scalar_t* g) {
  if (lo != 0 || hi != kBlockElems) {
    for (int64_t k = lo; k < hi; ++k) g[k] = static_cast<scalar_t>((e[k] * f - (k == y ? 1.0f : 0.0f)) * s);
    return;
  }
  const __m256 fv = _mm256_set1_ps(f), sv = _mm256_set1_ps(s);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int j = 0; j < 16; ++j) {
    const __m256 is_y = _mm256_castsi256_ps(_mm256_cmpeq_epi32(lane, _mm256_set1_epi32(static_cast<int>(y - 8 * j))));
    const __m256 p = _mm256_mul_ps(_mm256_loadu_ps(e + 8 * j), fv);
    const __m256 v = _mm256_mul_ps(_mm256_sub_ps(p, _mm256_and_ps(is_y, _mm256_set1_ps(1.0f))), sv);
    if constexpr (std::is_same_v<scalar_t, float>) {
      _mm256_storeu_ps(g + 8 * j, v);
    } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(g + 8 * j), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {  // bf16: round to nearest even on the bits (the values are finite)
      const __m256i bits = round_bf16_bits(v);
      const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(g + 8 * j), packed);
    }
  }
}

// (exp(z_k - l) - [k == y]) · s for the 8 lanes k = k0 .. k0 + 7 (zv: their logits as floats).
DROPREG_AVX2 inline __m256 grad_lanes_avx2(__m256 zv, int64_t k0, float l, int64_t y, float s) {
  __m256 p = Sleef_expf8_u10(_mm256_sub_ps(zv, _mm256_set1_ps(l)));
  if (y >= k0 && y < k0 + 8) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i is_y = _mm256_cmpeq_epi32(lane, _mm256_set1_epi32(static_cast<int>(y - k0)));
    p = _mm256_sub_ps(p, _mm256_and_ps(_mm256_castsi256_ps(is_y), _mm256_set1_ps(1.0f)));
  }
  return _mm256_mul_ps(p, _mm256_set1_ps(s));
}

// g[k] = (exp(float(z[k]) - l) - [k == y]) · s for k < n, rounded to scalar_t: the row of ce_grad.
// The ISA twin of grad_row_avx512 at 8 lanes, with SLEEF's 8-lane exp (the one the portable row's
// vexp takes): AVX2 has no masks, so the row's tail goes through a padded register, as vexp's does.
template <typename scalar_t>
DROPREG_AVX2 void grad_row_avx2(const scalar_t* z, int64_t n, float l, int64_t y, float s, scalar_t* g) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    _mm_prefetch(reinterpret_cast<const char*>(z + k) + kPrefetchBytes, _MM_HINT_T0);
    store8<scalar_t>(g + k, grad_lanes_avx2(load8<scalar_t>(z + k), k, l, y, s));
  }
  if (k < n) {
    alignas(32) float tail[8] = {};
    for (int64_t j = 0; k + j < n; ++j) tail[j] = static_cast<float>(z[k + j]);
    _mm256_store_ps(tail, grad_lanes_avx2(_mm256_load_ps(tail), k, l, y, s));
    for (int64_t j = 0; k + j < n; ++j) g[k + j] = static_cast<scalar_t>(tail[j]);
  }
}

// softmax_dot2_row_avx512's contract at 8 lanes (its ISA twin): p[k] = exp(float(z[k]) - l) (SLEEF's
// 8-lane exp, the portable row's vexp), w[k] = u_g[k] + s·u_t[k] (a null cotangent: 0), and
// partial[k % 16] += p[k]·w[k] (the product in float, the sum in double): elements 8j .. 8j + 7 go
// to partials 0..7 for even j, 8..15 for odd, each in increasing k.
template <typename scalar_t>
DROPREG_AVX2 void softmax_dot2_row_avx2(const scalar_t* z, const scalar_t* u_g, const scalar_t* u_t, float s,
                                        int64_t n, float l, float* p, float* w, double* partial) {
  const __m256 lv = _mm256_set1_ps(l), sv = _mm256_set1_ps(s);
  __m256d acc[4] = {_mm256_load_pd(partial), _mm256_load_pd(partial + 4), _mm256_load_pd(partial + 8),
                    _mm256_load_pd(partial + 12)};
  // w of the 8 lanes from ug[0..8), ut[0..8) (null: 0).
  const auto cotangent = [&](const scalar_t* ug, const scalar_t* ut) DROPREG_AVX2 {
    __m256 wv = ug != nullptr ? load8<scalar_t>(ug) : _mm256_setzero_ps();
    if (ut != nullptr) wv = _mm256_add_ps(wv, _mm256_mul_ps(sv, load8<scalar_t>(ut)));
    return wv;
  };
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 pv = Sleef_expf8_u10(_mm256_sub_ps(load8<scalar_t>(z + k), lv));
    const __m256 wv = cotangent(u_g != nullptr ? u_g + k : nullptr, u_t != nullptr ? u_t + k : nullptr);
    _mm256_storeu_ps(p + k, pv);
    _mm256_storeu_ps(w + k, wv);
    const __m256 prod = _mm256_mul_ps(pv, wv);
    const int half = static_cast<int>((k / 8) & 1);
    acc[2 * half] = _mm256_add_pd(acc[2 * half], _mm256_cvtps_pd(_mm256_castps256_ps128(prod)));
    acc[2 * half + 1] = _mm256_add_pd(acc[2 * half + 1], _mm256_cvtps_pd(_mm256_extractf128_ps(prod, 1)));
  }
  for (int q = 0; q < 4; ++q) _mm256_store_pd(partial + 4 * q, acc[q]);
  if (k < n) {  // the tail through padded registers, as vexp's; its partial sums element by element
    alignas(32) float zt[8] = {};
    alignas(32) scalar_t ug[8] = {}, ut[8] = {};
    for (int64_t j = 0; k + j < n; ++j) {
      zt[j] = static_cast<float>(z[k + j]) - l;
      if (u_g != nullptr) ug[j] = u_g[k + j];
      if (u_t != nullptr) ut[j] = u_t[k + j];
    }
    alignas(32) float pt[8], wt[8];
    _mm256_store_ps(pt, Sleef_expf8_u10(_mm256_load_ps(zt)));
    _mm256_store_ps(wt, cotangent(u_g != nullptr ? ug : nullptr, u_t != nullptr ? ut : nullptr));
    for (int64_t j = 0; k + j < n; ++j) {
      p[k + j] = pt[j];
      w[k + j] = wt[j];
      partial[(k + j) % kSumLanes] += static_cast<double>(pt[j] * wt[j]);
    }
  }
}

// softmax_vjp_row_avx512's contract at 8 lanes: g[k] = s·p[k]·(u[k] - pu), rounded to scalar_t.
template <typename scalar_t>
DROPREG_AVX2 void softmax_vjp_row_avx2(const float* p, const float* u, int64_t n, float pu, float s, scalar_t* g) {
  const __m256 puv = _mm256_set1_ps(pu), sv = _mm256_set1_ps(s);
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 sp = _mm256_mul_ps(sv, _mm256_loadu_ps(p + k));
    store8<scalar_t>(g + k, _mm256_mul_ps(sp, _mm256_sub_ps(_mm256_loadu_ps(u + k), puv)));
  }
  for (; k < n; ++k) g[k] = static_cast<scalar_t>(ce_grad_backward_element<float>(p[k], u[k], pu, s));
}

// softmax_vjp2_row_avx512's contract at 8 lanes: g[k] = p[k]·(w[k] - pw) + gl·(p[k] - [k == y]),
// rounded to scalar_t.
template <typename scalar_t>
DROPREG_AVX2 void softmax_vjp2_row_avx2(const float* p, const float* w, int64_t n, float pw, float gl, int64_t y,
                                        scalar_t* g) {
  const __m256 pwv = _mm256_set1_ps(pw), glv = _mm256_set1_ps(gl);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 pv = _mm256_loadu_ps(p + k);
    __m256 onehot_term = pv;  // p - [k == y]
    if (y >= k && y < k + 8) {
      const __m256 is_y = _mm256_castsi256_ps(_mm256_cmpeq_epi32(lane, _mm256_set1_epi32(static_cast<int>(y - k))));
      onehot_term = _mm256_sub_ps(pv, _mm256_and_ps(is_y, _mm256_set1_ps(1.0f)));
    }
    const __m256 vjp = _mm256_mul_ps(pv, _mm256_sub_ps(_mm256_loadu_ps(w + k), pwv));
    store8<scalar_t>(g + k, _mm256_add_ps(vjp, _mm256_mul_ps(glv, onehot_term)));
  }
  for (; k < n; ++k) g[k] = static_cast<scalar_t>(sample_grad_backward_element<float>(p[k], w[k], pw, gl, k == y));
}

}  // namespace cpu
}  // namespace dropreg
