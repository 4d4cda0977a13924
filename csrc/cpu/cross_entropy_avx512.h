// AVX-512 inner loops of the CPU cross-entropy kernels (cross_entropy.cpp), for float accumulation
// (f32, f16, bf16 logits), 16 logits a register, in the order of the portable loops beside their
// callers (the 16 partial sums included). G and the exact Gumbel scores use SLEEF's u10 exp/log,
// the functions torch.exp/log use (exp_log.h), so G and ŷ are the reference's bit for bit; the
// log-sum-exp's sum uses an inline exp within 2 ulp of it (exp_nonpositive_avx512), so lse agrees
// with the portable path to rounding, as it does with torch.logsumexp.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <limits>

#include "blocks.h"
#include "cross_entropy_row.h"
#include "exp_log.h"
#include "isa.h"
#include "load_store_simd.h"
#include "philox_simd.h"

namespace dropreg {
namespace cpu {

// exp(x) for x <= 0 to about 2 ulp, inline: x = n·ln2 + r with |r| <= ln2/2 (ln2 split in two,
// Cody-Waite), e^r by its degree-7 Taylor polynomial (truncation < 2^-27 relative), times 2^n by
// scalef. x < -104 (where exp is below the least subnormal), -inf and NaN give 0. For the
// log-sum-exp's sum and the candidate filter only: the sum is within rounding of SLEEF's (the lse
// is a rounded value anyway), the filter has a 1e-3 margin; G and the exact Gumbel scores keep SLEEF.
// Its ISA twin at 8 lanes is exp_nonpositive_avx2, which lacks scalef and stops at -87.3.
DROPREG_AVX512 inline __m512 exp_nonpositive_avx512(__m512 x) {
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

// The filter bits of a block's offsets [lo, hi) (the Gumbel stream at the u16 density: its 16 calls
// from first_call, 8 elements each) into h[0..128), in element order: only the calls that [lo, hi)
// touches, one chain of 8 when they lie in one half of the block.
DROPREG_AVX512 inline void filter_bits_avx512(uint64_t seed, uint64_t stream, uint64_t first_call, int64_t lo,
                                              int64_t hi, uint16_t* h) {
  uint32_t* words = reinterpret_cast<uint32_t*>(h);  // a call's four words are its 8 u16 in order
  if (hi <= kBlockElems / 2) {
    philox_run_avx512<1>(seed, stream, first_call, words);
  } else if (lo >= kBlockElems / 2) {
    philox_run_avx512<1>(seed, stream, first_call + 8, words + 32);
  } else {
    philox_run_avx512<2>(seed, stream, first_call, words);
  }
}

// sample_block_avx512 after its draws, over the registers j0 .. j1 - 1 that [lo, hi) touches
// (kFull: all 8, unrolled, the logits in registers). A skipped register's lanes are outside the
// row: they would add exact zeros to the sum and pass no candidate. Its ISA twin at 8 lanes is
// sample_registers_avx2, which pads the row's edges for want of masks.
template <bool kFull, typename scalar_t>
DROPREG_AVX512 __attribute__((always_inline)) inline int64_t sample_registers_avx512(
    const scalar_t* z, int64_t lo, int64_t hi, RowState<float>& st, float* e_out, const uint16_t* h, int32_t* cand) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  constexpr int kNonFinite = 0x01 | 0x08 | 0x10 | 0x80;  // fpclass: QNaN, +inf, -inf, SNaN
  const int j0 = kFull ? 0 : static_cast<int>(lo / 16);
  const int j1 = kFull ? 8 : static_cast<int>((hi + 15) / 16);
  const __m512 neg_inf = _mm512_set1_ps(-kInf);
  __mmask16 in[8];
  __m512 x[8];
  __m512 mx = neg_inf;
  __mmask16 bad = 0;
  for (int j = j0; j < j1; ++j) {
    in[j] = kFull ? static_cast<__mmask16>(0xFFFF) : lanes_between(lo - 16 * j, hi - 16 * j);
    _mm_prefetch(reinterpret_cast<const char*>(z + 16 * j) + kPrefetchBytes, _MM_HINT_T0);
    x[j] = load16<scalar_t>(z + 16 * j, in[j]);
    if (!kFull) x[j] = _mm512_mask_blend_ps(in[j], neg_inf, x[j]);
    mx = _mm512_max_ps(x[j], mx);  // vmaxps returns its second operand when either is NaN
    bad |= _mm512_mask_fpclass_ps_mask(in[j], x[j], kNonFinite);
  }
  if (bad != 0) {
    st.nonfinite = true;
    for (int j = j0; j < j1; ++j) st.nan |= _mm512_mask_cmp_ps_mask(in[j], x[j], x[j], _CMP_UNORD_Q) != 0;
  }
  const float block_max = _mm512_reduce_max_ps(mx);
  if (block_max > st.m) st.raise_max(block_max);
  const bool add = st.m > -kInf;  // while m = -inf every value so far is -inf and adds 0
  const bool exact = st.nonfinite || !(st.bound < kInf);
  const __m512 mv = _mm512_set1_ps(st.m);
  // The filter 1 - u < e·bound on the integers: 1 - u >= (w + 1/2)·2^-23 with w = gumbel_filter_w(h)
  // (cross_entropy.h: (2^16 - 1 - h)·2^7, exact in float), so with B = bound·2^23 an element passes
  // iff w < fma(e, B, -1/2): one rounding, like the portable e·bound (and covered by the same 1e-3
  // margin: a winner needs e·B > 1/2, where the rounding is ~2^-24 relative).
  const __m512 big_b = _mm512_set1_ps(st.bound * 8388608.0f);
  const __m512 minus_half = _mm512_set1_ps(-0.5f);
  const __m512i all16 = _mm512_set1_epi32(0xFFFF);
  const __m512i step = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 sum = _mm512_setzero_ps();
  int64_t count = 0;
  for (int j = j0; j < j1; ++j) {
    __m512 e = exp_nonpositive_avx512(_mm512_sub_ps(x[j], mv));
    if (!kFull) e = _mm512_maskz_mov_ps(in[j], e);
    sum = _mm512_add_ps(sum, e);
    if (e_out != nullptr) _mm512_mask_storeu_ps(e_out + 16 * j, in[j], e);
    __mmask16 pass = in[j];
    if (!exact) {
      const __m512i hj = _mm512_cvtepu16_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(h + 16 * j)));
      const __m512 w = _mm512_cvtepi32_ps(_mm512_slli_epi32(_mm512_xor_si512(hj, all16), 7));
      pass = _mm512_mask_cmp_ps_mask(in[j], w, _mm512_fmadd_ps(e, big_b, minus_half), _CMP_LT_OQ);
    }
    if (pass != 0) {
      // Compressed in a register, then stored whole (count <= 16·(j - j0), so the 16 slots stay
      // within cand's 128): the compress-store form takes ~50 cycles on Zen 4, this ~4.
      const __m512i offsets = _mm512_add_epi32(step, _mm512_set1_epi32(16 * j));
      _mm512_storeu_si512(cand + count, _mm512_maskz_compress_epi32(pass, offsets));
      count += __builtin_popcount(pass);
    }
  }
  if (add) {
    const __m512d lo_sum = _mm512_add_pd(_mm512_load_pd(st.partial), _mm512_cvtps_pd(_mm512_castps512_ps256(sum)));
    const __m512d hi_sum = _mm512_add_pd(
        _mm512_load_pd(st.partial + 8),
        _mm512_cvtps_pd(_mm256_castsi256_ps(_mm512_extracti64x4_epi64(_mm512_castps_si512(sum), 1))));
    _mm512_store_pd(st.partial, lo_sum);
    _mm512_store_pd(st.partial + 8, hi_sum);
  }
  return count;
}

// One 128-element block of the sample pass, all in registers: the block is the flat indices
// [blk, blk + 128) (blk a multiple of 128, so its filter bits are the 16 calls from blk / 8), of
// which [lo, hi) (offsets from blk) belong to the row. `z` points at flat index blk. In the order
// of the portable loops of cross_entropy.cpp: the block max (NaN never wins) and the non-finite
// flags; the running max and the earlier partial sums rescaled when it grows; e = exp(z - m)
// (exp_nonpositive_avx512) and their sum, added over the registers in order, into the 16 double
// partials; e stored at e_out[0..128) when e_out is not null (the fused gradient's row buffer);
// the filter bits of [lo, hi) stored at h; the offsets of the elements that may beat the best
// score so far (the filter of cross_entropy.cpp; every element of the row when `exact`) into cand
// in increasing order. Returns their number. Only the registers and Philox calls that [lo, hi)
// touches are computed (a row of a 4-column tensor takes one register and one chain).
template <typename scalar_t>
DROPREG_AVX512 int64_t sample_block_avx512(const scalar_t* z, int64_t lo, int64_t hi, RowState<float>& st,
                                           uint64_t seed, uint64_t stream, uint64_t first_call, float* e_out,
                                           uint16_t* h, int32_t* cand) {
  // The draws first, into h (L1): the Philox chains and the logits' registers are not live together.
  filter_bits_avx512(seed, stream, first_call, lo, hi, h);
  if (lo == 0 && hi == kBlockElems) return sample_registers_avx512<true>(z, lo, hi, st, e_out, h, cand);
  return sample_registers_avx512<false>(z, lo, hi, st, e_out, h, cand);
}

// g[k] = (e[k]·f - [k == y])·s rounded to scalar_t for the offsets k in [lo, hi) of a 128-element
// block: a gradient's softmax from the sample pass's e = exp(z - m_b) and f = exp(m_b - lse) (y:
// the label's offset in the block, or -1; s: the row's scale), in the order of ce_grad's formula.
template <typename scalar_t>
DROPREG_AVX512 void scale_block_avx512(const float* e, int64_t lo, int64_t hi, float f, int64_t y, float s,
                                       scalar_t* g) {
  const __m512 fv = _mm512_set1_ps(f), sv = _mm512_set1_ps(s), one = _mm512_set1_ps(1.0f);
  for (int j = 0; j < 8; ++j) {
    const __mmask16 in = lanes_between(lo - 16 * j, hi - 16 * j);
    if (in == 0) continue;
    __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(in, e + 16 * j), fv);
    if (y >= 16 * j && y < 16 * j + 16) v = _mm512_mask_sub_ps(v, static_cast<__mmask16>(1u << (y - 16 * j)), v, one);
    store16<scalar_t>(g + 16 * j, _mm512_mul_ps(v, sv), in);
  }
}

// g[k] = (exp(float(z[k]) - l) - [k == y]) · s for k < n, rounded to scalar_t: the row of ce_grad
// (y < 0 or ≥ n: no one-hot in this row).
template <typename scalar_t>
DROPREG_AVX512 void grad_row_avx512(const scalar_t* z, int64_t n, float l, int64_t y, float s, scalar_t* g) {
  const __m512 lv = _mm512_set1_ps(l), sv = _mm512_set1_ps(s), one = _mm512_set1_ps(1.0f);
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 in = lanes(n - k);
    _mm_prefetch(reinterpret_cast<const char*>(z + k) + kPrefetchBytes, _MM_HINT_T0);
    __m512 p = Sleef_expf16_u10(_mm512_sub_ps(load16<scalar_t>(z + k, in), lv));
    if (y >= k && y < k + 16) p = _mm512_mask_sub_ps(p, static_cast<__mmask16>(1u << (y - k)), p, one);
    store16<scalar_t>(g + k, _mm512_mul_ps(p, sv), in);
  }
}

// ce_grad_backward's second pass: g[k] = s·p[k]·(u[k] - pu) for k < n (ce_grad_backward_element),
// from the row buffers p and u (the cotangent as softmax_dot2_row left it), rounded to scalar_t.
template <typename scalar_t>
DROPREG_AVX512 void softmax_vjp_row_avx512(const float* p, const float* u, int64_t n, float pu, float s, scalar_t* g) {
  const __m512 puv = _mm512_set1_ps(pu), sv = _mm512_set1_ps(s);
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 in = lanes(n - k);
    const __m512 sp = _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(in, p + k));
    store16<scalar_t>(g + k, _mm512_mul_ps(sp, _mm512_sub_ps(_mm512_maskz_loadu_ps(in, u + k), puv)), in);
  }
}

// The first pass of a row of ce_grad_backward and of the fused op's backward: p[k] = exp(float(z[k])
// - l) (SLEEF, as ce_grad) and w[k] = u_g[k] + s·u_t[k] (either cotangent may be null: 0) into the
// row buffers p and w, and ⟨p, w⟩'s partial sums partial[k % 16] += p[k]·w[k] (the product in
// float, the sum in double).
template <typename scalar_t>
DROPREG_AVX512 void softmax_dot2_row_avx512(const scalar_t* z, const scalar_t* u_g, const scalar_t* u_t, float s,
                                            int64_t n, float l, float* p, float* w, double* partial) {
  const __m512 lv = _mm512_set1_ps(l), sv = _mm512_set1_ps(s);
  __m512d lo = _mm512_load_pd(partial), hi = _mm512_load_pd(partial + 8);
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 in = lanes(n - k);
    const __m512 pv = Sleef_expf16_u10(_mm512_sub_ps(load16<scalar_t>(z + k, in), lv));
    __m512 wv = u_g != nullptr ? load16<scalar_t>(u_g + k, in) : _mm512_setzero_ps();
    if (u_t != nullptr) wv = _mm512_add_ps(wv, _mm512_mul_ps(sv, load16<scalar_t>(u_t + k, in)));
    _mm512_mask_storeu_ps(p + k, in, pv);
    _mm512_mask_storeu_ps(w + k, in, wv);
    const __m512 prod = _mm512_mul_ps(pv, wv);
    lo = _mm512_mask_add_pd(lo, static_cast<__mmask8>(in), lo, _mm512_cvtps_pd(_mm512_castps512_ps256(prod)));
    hi = _mm512_mask_add_pd(hi, static_cast<__mmask8>(in >> 8), hi,
                            _mm512_cvtps_pd(_mm256_castsi256_ps(_mm512_extracti64x4_epi64(_mm512_castps_si512(prod), 1))));
  }
  _mm512_store_pd(partial, lo);
  _mm512_store_pd(partial + 8, hi);
}

// Its second pass: g[k] = p[k]·(w[k] - pw) + gl·(p[k] - [k == y]) for k < n, rounded to scalar_t.
template <typename scalar_t>
DROPREG_AVX512 void softmax_vjp2_row_avx512(const float* p, const float* w, int64_t n, float pw, float gl, int64_t y,
                                            scalar_t* g) {
  const __m512 pwv = _mm512_set1_ps(pw), glv = _mm512_set1_ps(gl), one = _mm512_set1_ps(1.0f);
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 in = lanes(n - k);
    const __m512 pv = _mm512_maskz_loadu_ps(in, p + k);
    __m512 onehot_term = pv;  // p - [k == y]
    if (y >= k && y < k + 16) onehot_term = _mm512_mask_sub_ps(pv, static_cast<__mmask16>(1u << (y - k)), pv, one);
    const __m512 vjp = _mm512_mul_ps(pv, _mm512_sub_ps(_mm512_maskz_loadu_ps(in, w + k), pwv));
    store16<scalar_t>(g + k, _mm512_add_ps(vjp, _mm512_mul_ps(glv, onehot_term)), in);
  }
}

}  // namespace cpu
}  // namespace dropreg
