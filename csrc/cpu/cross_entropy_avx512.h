// AVX-512 inner loops of the CPU cross-entropy kernels (cross_entropy.cpp), for float accumulation
// (f32, f16, bf16 logits), 16 logits a register, in the order of the portable loops beside their
// callers (the 16 partial sums included). G and the exact Gumbel scores use SLEEF's u10 exp/log,
// the functions torch.exp/log use (cpu_kernels.h), so G and ŷ are the reference's bit for bit; the
// log-sum-exp's sum uses an inline exp within 2 ulp of it (exp_nonpositive), so lse agrees with the
// portable path to rounding, as it does with torch.logsumexp.
#pragma once

#include "cpu_kernels.h"
#include "dropout_avx512.h"

#if DROPREG_HAVE_AVX512_DROPOUT && DROPREG_X86_SLEEF

#include <limits>

#define DROPREG_HAVE_AVX512_CE 1

namespace dropreg {
namespace cpu {

// e[k] = float(z[k]) for k < n; returns the block's max (NaN never wins it; -inf when n = 0) and
// sets *nonfinite / *nan when some z is not finite / is NaN.
template <typename scalar_t>
DROPREG_AVX512 float scan_block(const scalar_t* z, int64_t n, float* e, bool* nonfinite, bool* nan) {
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 bad = 0, unordered = 0;
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 in = lanes(n - k);
    const __m512 x = load16<scalar_t>(z + k, in);
    _mm512_mask_storeu_ps(e + k, in, x);
    mx = _mm512_mask_max_ps(mx, _mm512_kand(in, _mm512_cmp_ps_mask(x, mx, _CMP_GT_OQ)), x, mx);
    bad |= _mm512_mask_cmp_ps_mask(in, _mm512_abs_ps(x), inf, _CMP_NLT_UQ);  // |x| >= inf or NaN
    unordered |= _mm512_mask_cmp_ps_mask(in, x, x, _CMP_UNORD_Q);
  }
  *nonfinite |= bad != 0;
  *nan |= unordered != 0;
  alignas(64) float lane_max[16];
  _mm512_store_ps(lane_max, mx);
  float block_max = lane_max[0];
  for (int j = 1; j < 16; ++j) block_max = lane_max[j] > block_max ? lane_max[j] : block_max;
  return block_max;
}

// exp(x) for x <= 0 to about 2 ulp, inline: x = n·ln2 + r with |r| <= ln2/2 (ln2 split in two,
// Cody-Waite), e^r by its degree-7 Taylor polynomial (truncation < 2^-27 relative), times 2^n by
// scalef. x < -104 (where exp is below the least subnormal), -inf and NaN give 0. For the
// log-sum-exp's sum and the candidate filter only: the sum is within rounding of SLEEF's (the lse
// is a rounded value anyway), the filter has a 1e-3 margin; G and the exact Gumbel scores keep SLEEF.
DROPREG_AVX512 inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));  // NaN -> -104 (vmaxps returns its second operand)
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860676533018704e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// e[k] = exp(e[k] - m) for k < n (exp_nonpositive) and, when `add`, partial[k % 16] += e[k] in double.
DROPREG_AVX512 inline void exp_sum_block(float* e, int64_t n, float m, bool add, double* partial) {
  const __m512 mv = _mm512_set1_ps(m);
  __m512d lo = _mm512_loadu_pd(partial), hi = _mm512_loadu_pd(partial + 8);
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 in = lanes(n - k);
    const __m512 v = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(in, e + k), mv));
    _mm512_mask_storeu_ps(e + k, in, v);
    if (add) {
      lo = _mm512_mask_add_pd(lo, static_cast<__mmask8>(in), lo, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
      hi = _mm512_mask_add_pd(hi, static_cast<__mmask8>(in >> 8), hi,
                              _mm512_cvtps_pd(_mm256_castsi256_ps(_mm512_extracti64x4_epi64(_mm512_castps_si512(v), 1))));
    }
  }
  _mm512_storeu_pd(partial, lo);
  _mm512_storeu_pd(partial + 8, hi);
}

// The candidates of the Gumbel-max filter: the k < n with 1 - uniform_open01(u[k]) < e[k]·bound,
// in increasing order, into cand; returns their count.
DROPREG_AVX512 inline int64_t candidates(const uint32_t* u, const float* e, int64_t n, float bound, int32_t* cand) {
  const __m512 b = _mm512_set1_ps(bound);
  const __m512 half = _mm512_set1_ps(0.5f), ulp = _mm512_set1_ps(1.1920928955078125e-07f), one = _mm512_set1_ps(1.0f);
  const __m512i step = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t count = 0;
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 in = lanes(n - k);
    const __m512i w = _mm512_srli_epi32(_mm512_maskz_loadu_epi32(in, u + k), 9);
    // uniform_open01 as regularizer.h writes it: (float(u >> 9) + 0.5) · 2^-23, then 1 - that
    const __m512 one_minus_u = _mm512_sub_ps(one, _mm512_mul_ps(_mm512_add_ps(_mm512_cvtepi32_ps(w), half), ulp));
    const __mmask16 pass =
        _mm512_mask_cmp_ps_mask(in, one_minus_u, _mm512_mul_ps(_mm512_maskz_loadu_ps(in, e + k), b), _CMP_LT_OQ);
    if (pass != 0) {
      _mm512_mask_compressstoreu_epi32(cand + count, pass,
                                       _mm512_add_epi32(step, _mm512_set1_epi32(static_cast<int>(k))));
      count += __builtin_popcount(pass);
    }
  }
  return count;
}

// g[k] = (exp(float(z[k]) - l) - [k == y]) · s for k < n, rounded to scalar_t: the row of ce_grad
// (y < 0 or ≥ n: no one-hot in this row).
template <typename scalar_t>
DROPREG_AVX512 void grad_row(const scalar_t* z, int64_t n, float l, int64_t y, float s, scalar_t* g) {
  const __m512 lv = _mm512_set1_ps(l), sv = _mm512_set1_ps(s), one = _mm512_set1_ps(1.0f);
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 in = lanes(n - k);
    __m512 p = Sleef_expf16_u10(_mm512_sub_ps(load16<scalar_t>(z + k, in), lv));
    if (y >= k && y < k + 16) p = _mm512_mask_sub_ps(p, static_cast<__mmask16>(1u << (y - k)), p, one);
    store16<scalar_t>(g + k, _mm512_mul_ps(p, sv), in);
  }
}

}  // namespace cpu
}  // namespace dropreg

#else
#define DROPREG_HAVE_AVX512_CE 0
#endif
