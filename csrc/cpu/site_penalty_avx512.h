// AVX-512 loops of the CPU site penalty (site_penalty.cpp) for float accumulation (f32, f16, bf16
// inputs), 16 elements a register, η made in the registers from the Philox words (a bit per
// element for Rademacher noise, a 16-bit compare for the dropout kind). The forward keeps 16
// partial sums per chunk (element k adds to lane k % 16, the lanes summed in order), as the
// portable loop does; the backward rounds each product and sum in the order of site_penalty.h's
// formulas (the _round intrinsics are never contracted: docs/numerics.md), so dh, dg_e and dg_i
// are the reference's bit for bit. Their ISA twins at 8 elements a register: site_penalty_avx2.h.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "isa.h"
#include "load_store_simd.h"

namespace dropreg {
namespace cpu {

// The η of elements k .. k + 15 of a chunk (k a multiple of 16): u holds the chunk's words (bit k of
// the Rademacher stream at u[k / 32] >> (k % 32), draw k of the dropout kind at u16 k).
DROPREG_AVX512 inline __m512 site_eta16(const uint32_t* u, int64_t k, bool rademacher, __m512 a, __m512 neg,
                                       __m256i threshold) {
  if (rademacher) {
    const __mmask16 bits = static_cast<__mmask16>(u[k >> 5] >> (k & 31));
    return _mm512_mask_blend_ps(bits, neg, a);  // bit 1: a, bit 0: -a
  }
  const __m256i draws = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const uint16_t*>(u) + k));
  return _mm512_mask_blend_ps(_mm256_cmpge_epu16_mask(draws, threshold), neg, a);  // kept: a, dropped: -1
}

#define DROPREG_MUL(x, y) _mm512_mul_round_ps(x, y, _MM_FROUND_CUR_DIRECTION)
#define DROPREG_ADD(x, y) _mm512_add_round_ps(x, y, _MM_FROUND_CUR_DIRECTION)

// The chunk's two sums Σ (g_e h)² and Σ g_i η h over m elements (ge / gi may be null: that sum is 0).
// Its ISA twin at 8 lanes is site_sums_avx2, which has no masks for a chunk's tail.
template <typename scalar_t>
DROPREG_AVX512 void site_sums_avx512(const scalar_t* h, const scalar_t* ge, const scalar_t* gi, int64_t m,
                                     const uint32_t* u, bool rademacher, float amplitude, float negative,
                                     uint32_t threshold, float* explicit_sum, float* implicit_sum) {
  const __m512 a = _mm512_set1_ps(amplitude), neg = _mm512_set1_ps(negative);
  const __m256i thr = _mm256_set1_epi16(static_cast<short>(threshold));
  __m512 se = _mm512_setzero_ps(), si = _mm512_setzero_ps();
  for (int64_t k = 0; k < m; k += 16) {
    const __mmask16 in = lanes(m - k);
    const __m512 hv = load16<scalar_t>(h + k, in);
    if (ge != nullptr) {
      const __m512 t = DROPREG_MUL(load16<scalar_t>(ge + k, in), hv);
      se = _mm512_mask_add_ps(se, in, se, DROPREG_MUL(t, t));
    }
    if (gi != nullptr) {
      const __m512 eta = site_eta16(u, k, rademacher, a, neg, thr);
      si = _mm512_mask_add_ps(si, in, si, DROPREG_MUL(DROPREG_MUL(load16<scalar_t>(gi + k, in), eta), hv));
    }
  }
  alignas(64) float lanes_e[16], lanes_i[16];
  _mm512_store_ps(lanes_e, se);
  _mm512_store_ps(lanes_i, si);
  float sum_e = 0, sum_i = 0;
  for (int j = 0; j < 16; ++j) {
    sum_e += lanes_e[j];
    sum_i += lanes_i[j];
  }
  *explicit_sum = sum_e;
  *implicit_sum = sum_i;
}

// dh = 2a·g_e²·h + b·g_i·η, dg_e = 2a·g_e·h², dg_i = b·η·h over m elements of a chunk. Its ISA
// twin at 8 lanes is site_backward_avx2, which has no masks for a chunk's tail.
template <typename scalar_t>
DROPREG_AVX512 void site_backward_avx512(float a2_s, float b_s, const scalar_t* h, const scalar_t* ge,
                                         const scalar_t* gi, int64_t m, const uint32_t* u, bool rademacher,
                                         float amplitude, float negative, uint32_t threshold, scalar_t* dh,
                                         scalar_t* dge, scalar_t* dgi) {
  const __m512 a = _mm512_set1_ps(amplitude), neg = _mm512_set1_ps(negative);
  const __m512 a2 = _mm512_set1_ps(a2_s), b = _mm512_set1_ps(b_s);
  const __m256i thr = _mm256_set1_epi16(static_cast<short>(threshold));
  for (int64_t k = 0; k < m; k += 16) {
    const __mmask16 in = lanes(m - k);
    const __m512 hv = load16<scalar_t>(h + k, in);
    __m512 d = _mm512_setzero_ps();
    if (ge != nullptr) {
      const __m512 gev = load16<scalar_t>(ge + k, in);
      const __m512 a2g = DROPREG_MUL(a2, gev);
      d = DROPREG_ADD(d, DROPREG_MUL(DROPREG_MUL(a2g, gev), hv));  // 0 + term: +0 for a -0 term
      store16<scalar_t>(dge + k, DROPREG_MUL(DROPREG_MUL(a2g, hv), hv), in);
    }
    if (gi != nullptr) {
      const __m512 eta = site_eta16(u, k, rademacher, a, neg, thr);
      d = DROPREG_ADD(d, DROPREG_MUL(DROPREG_MUL(b, load16<scalar_t>(gi + k, in)), eta));
      store16<scalar_t>(dgi + k, DROPREG_MUL(DROPREG_MUL(b, eta), hv), in);
    }
    store16<scalar_t>(dh + k, d, in);
  }
}

#undef DROPREG_MUL
#undef DROPREG_ADD

}  // namespace cpu
}  // namespace dropreg
