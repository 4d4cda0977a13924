// AVX2 loops of the CPU site penalty (site_penalty.cpp) for float accumulation on CPUs with AVX2 +
// F16C and no AVX-512: the loops of site_penalty_avx512.h at 8 elements a register (their ISA
// twins), on whole 16-element steps (the caller takes the portable loop for a chunk of another
// length). A chunk's 16 partial sums are two registers (element k adds to lane k % 16, the lanes
// summed in order), so the sums are the AVX-512 path's and the portable loop's bit for bit. Compiled
// without FMA (DROPREG_AVX2_NO_FMA): the backward rounds each product and sum in the order of
// site_penalty.h's formulas (docs/numerics.md).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "isa.h"
#include "load_store_simd.h"

namespace dropreg {
namespace cpu {

// The η of elements k .. k + 7 of a chunk (k a multiple of 8), from the chunk's Philox words u as
// site_penalty_avx512.h's site_eta16 reads them: bit k of the Rademacher stream, or u16 draw k of
// the dropout kind (kept, draw >= threshold: a; dropped: the negative value).
DROPREG_AVX2_NO_FMA inline __m256 site_eta8(const uint32_t* u, int64_t k, bool rademacher, __m256 a, __m256 neg,
                                            __m256i threshold_minus_1) {
  __m256i take_a;
  if (rademacher) {
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i bits = _mm256_set1_epi32(static_cast<int>((u[k >> 5] >> (k & 31)) & 0xFFu));
    take_a = _mm256_cmpeq_epi32(_mm256_and_si256(bits, lane_bit), lane_bit);
  } else {
    const __m128i draws16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(reinterpret_cast<const uint16_t*>(u) + k));
    take_a = _mm256_cmpgt_epi32(_mm256_cvtepu16_epi32(draws16), threshold_minus_1);  // 0..65535: signed is exact
  }
  return _mm256_blendv_ps(neg, a, _mm256_castsi256_ps(take_a));
}

// The chunk's two sums Σ (g_e h)² and Σ g_i η h over m elements, m a multiple of 16 (ge / gi may be
// null: that sum is 0): site_sums_avx512 at half the width (its ISA twin), each of its registers
// as two; with no masks for a chunk's tail, whole 16-element steps only.
template <typename scalar_t>
DROPREG_AVX2_NO_FMA void site_sums_avx2(const scalar_t* h, const scalar_t* ge, const scalar_t* gi, int64_t m,
                                        const uint32_t* u, bool rademacher, float amplitude, float negative,
                                        uint32_t threshold, float* explicit_sum, float* implicit_sum) {
  const __m256 a = _mm256_set1_ps(amplitude), neg = _mm256_set1_ps(negative);
  const __m256i thr = _mm256_set1_epi32(static_cast<int>(threshold) - 1);
  __m256 se[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, si[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t k = 0; k < m; k += 16) {
    for (int half = 0; half < 2; ++half) {  // lanes 0-7, then 8-15, of the AVX-512 path's 16
      const int64_t j = k + 8 * half;
      const __m256 hv = load8<scalar_t>(h + j);
      if (ge != nullptr) {
        const __m256 t = _mm256_mul_ps(load8<scalar_t>(ge + j), hv);
        se[half] = _mm256_add_ps(se[half], _mm256_mul_ps(t, t));
      }
      if (gi != nullptr) {
        const __m256 eta = site_eta8(u, j, rademacher, a, neg, thr);
        si[half] = _mm256_add_ps(si[half], _mm256_mul_ps(_mm256_mul_ps(load8<scalar_t>(gi + j), eta), hv));
      }
    }
  }
  alignas(32) float lanes_e[16], lanes_i[16];
  _mm256_store_ps(lanes_e, se[0]);
  _mm256_store_ps(lanes_e + 8, se[1]);
  _mm256_store_ps(lanes_i, si[0]);
  _mm256_store_ps(lanes_i + 8, si[1]);
  float sum_e = 0, sum_i = 0;
  for (int j = 0; j < 16; ++j) {
    sum_e += lanes_e[j];
    sum_i += lanes_i[j];
  }
  *explicit_sum = sum_e;
  *implicit_sum = sum_i;
}

// dh = 2a·g_e²·h + b·g_i·η, dg_e = 2a·g_e·h², dg_i = b·η·h over m elements of a chunk, m a multiple
// of 8, each product and sum rounded in site_penalty_avx512.h's order: site_backward_avx512 at half
// the width (its ISA twin).
template <typename scalar_t>
DROPREG_AVX2_NO_FMA void site_backward_avx2(float a2_s, float b_s, const scalar_t* h, const scalar_t* ge,
                                            const scalar_t* gi, int64_t m, const uint32_t* u, bool rademacher,
                                            float amplitude, float negative, uint32_t threshold, scalar_t* dh,
                                            scalar_t* dge, scalar_t* dgi) {
  const __m256 a = _mm256_set1_ps(amplitude), neg = _mm256_set1_ps(negative);
  const __m256 a2 = _mm256_set1_ps(a2_s), b = _mm256_set1_ps(b_s);
  const __m256i thr = _mm256_set1_epi32(static_cast<int>(threshold) - 1);
  for (int64_t k = 0; k < m; k += 8) {
    const __m256 hv = load8<scalar_t>(h + k);
    __m256 d = _mm256_setzero_ps();
    if (ge != nullptr) {
      const __m256 gev = load8<scalar_t>(ge + k);
      const __m256 a2g = _mm256_mul_ps(a2, gev);
      d = _mm256_add_ps(d, _mm256_mul_ps(_mm256_mul_ps(a2g, gev), hv));  // 0 + term: +0 for a -0 term
      store8<scalar_t>(dge + k, _mm256_mul_ps(_mm256_mul_ps(a2g, hv), hv));
    }
    if (gi != nullptr) {
      const __m256 eta = site_eta8(u, k, rademacher, a, neg, thr);
      d = _mm256_add_ps(d, _mm256_mul_ps(_mm256_mul_ps(b, load8<scalar_t>(gi + k)), eta));
      store8<scalar_t>(dgi + k, _mm256_mul_ps(_mm256_mul_ps(b, eta), hv));
    }
    store8<scalar_t>(dh + k, d);
  }
}

}  // namespace cpu
}  // namespace dropreg
