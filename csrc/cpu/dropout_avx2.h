// AVX2 dropout: the AVX-512 loops (dropout_avx512.h) at half the width, their ISA twin, for the CPUs
// that have AVX2 + FMA + F16C and no AVX-512: Philox on 16 calls at once (philox16, philox_simd.h)
// and the mask applied from the registers, 128 elements (16 calls x 8 u16 draws) per step, for f64 /
// f32 / f16 / bf16, fresh output or in place; plus the apply from draws in memory for the strided
// walk. AVX2 has no unsigned 16-bit compare: u16 >= t is max(u16, t) == u16. The 16-bit keep masks
// are sign-extended to the element width and ANDed with the products (dropped -> +0). Rounding as
// load_store_simd.h's (a NaN keeps the bits the multiply made, as on AVX-512).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "dropout.h"
#include "isa.h"
#include "load_store_simd.h"
#include "philox.h"
#include "philox_simd.h"

namespace dropreg {
namespace cpu {

constexpr int64_t kAvx2StepElems = kAvx2StepCalls * kU16PerGroup;  // 128 elements

// All ones in the 16-bit lanes whose draw keeps its element (u16 >= threshold, threshold < 2^16).
DROPREG_AVX2 inline __m256i keep16(__m256i draws, __m256i threshold) {
  return _mm256_cmpeq_epi16(_mm256_max_epu16(draws, threshold), draws);
}

// y[0..16) = keep ? x·scale : +0, from the 16-bit keep masks of the 16 elements. y may be x.
template <typename scalar_t>
DROPREG_AVX2 inline void apply16(const scalar_t* x, scalar_t* y, __m256i keep, double scale_d) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    const __m256d scale = _mm256_set1_pd(scale_d);
    const __m128i k_lo = _mm256_castsi256_si128(keep), k_hi = _mm256_extracti128_si256(keep, 1);
    const __m128i k[4] = {k_lo, _mm_srli_si128(k_lo, 8), k_hi, _mm_srli_si128(k_hi, 8)};
    for (int v = 0; v < 4; ++v) {
      const __m256d mask = _mm256_castsi256_pd(_mm256_cvtepi16_epi64(k[v]));
      _mm256_storeu_pd(y + 4 * v, _mm256_and_pd(_mm256_mul_pd(_mm256_loadu_pd(x + 4 * v), scale), mask));
    }
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    const __m256 scale = _mm256_set1_ps(static_cast<float>(scale_d));
    const __m256 m_lo = _mm256_castsi256_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(keep)));
    const __m256 m_hi = _mm256_castsi256_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(keep, 1)));
    const __m256 lo = _mm256_mul_ps(_mm256_loadu_ps(x), scale), hi = _mm256_mul_ps(_mm256_loadu_ps(x + 8), scale);
    _mm256_storeu_ps(y, _mm256_and_ps(lo, m_lo));
    _mm256_storeu_ps(y + 8, _mm256_and_ps(hi, m_hi));
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    const __m256 scale = _mm256_set1_ps(static_cast<float>(scale_d));
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    const __m256 lo = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(raw)), scale);
    const __m256 hi = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(raw, 1)), scale);
    constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m256i halves = _mm256_setr_m128i(_mm256_cvtps_ph(lo, kNearest), _mm256_cvtps_ph(hi, kNearest));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), _mm256_and_si256(halves, keep));
  } else {  // bf16: unpacking with zero makes each bf16 the high half of a float; the pack undoes the order
    const __m256 scale = _mm256_set1_ps(static_cast<float>(scale_d));
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    const __m256i zero = _mm256_setzero_si256();
    const __m256 lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw));
    const __m256 hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw));
    const __m256i packed = _mm256_packus_epi32(round_bf16_bits(_mm256_mul_ps(lo, scale)),
                                               round_bf16_bits(_mm256_mul_ps(hi, scale)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), _mm256_and_si256(packed, keep));
  }
}

// y[0..n) = dropout of x[0..n) with draws u16[0..n) in memory order (a tile's). y may be x.
// threshold < 2^16.
template <typename scalar_t, typename acc_t>
DROPREG_AVX2 void apply_u16_avx2(const scalar_t* x, scalar_t* y, const uint16_t* u16, int64_t n, uint32_t threshold,
                                 acc_t scale) {
  const __m256i thr = _mm256_set1_epi16(static_cast<short>(threshold));
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i draws = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u16 + i));
    apply16<scalar_t>(x + i, y + i, keep16(draws, thr), static_cast<double>(scale));
  }
  for (; i < n; ++i) y[i] = dropout_element<scalar_t, acc_t>(x[i], u16[i], threshold, scale);
}

// y[0..n) = dropout of x[0..n) for the elements whose first index is `first` (a multiple of 128):
// calls first/8 ... of the mask stream. y may be x. threshold < 2^16.
template <typename scalar_t, typename acc_t>
DROPREG_AVX2 void dropout_avx2(const scalar_t* x, scalar_t* y, int64_t n, int64_t first, uint32_t threshold,
                               acc_t scale, uint64_t seed, uint64_t offset) {
  const uint64_t s = offset + kStreamDropoutMask;
  const __m256i thr = _mm256_set1_epi16(static_cast<short>(threshold));
  for (int64_t base = 0; base < n; base += kAvx2StepElems) {
    __m256i d[8];
    philox16(seed, s, static_cast<uint64_t>(first + base) / kU16PerGroup, d);
    const int64_t left = n - base;
    if (left >= kAvx2StepElems) {
      for (int j = 0; j < 8; ++j) {
        apply16<scalar_t>(x + base + 16 * j, y + base + 16 * j, keep16(d[j], thr), static_cast<double>(scale));
      }
    } else {  // the last, partial step: its draws from memory, element by element
      alignas(32) uint16_t draws[kAvx2StepElems];
      for (int j = 0; j < 8; ++j) _mm256_store_si256(reinterpret_cast<__m256i*>(draws + 16 * j), d[j]);
      for (int64_t e = 0; e < left; ++e) {
        y[base + e] = dropout_element<scalar_t, acc_t>(x[base + e], draws[e], threshold, scale);
      }
    }
  }
}

}  // namespace cpu
}  // namespace dropreg
