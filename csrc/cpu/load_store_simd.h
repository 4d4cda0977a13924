// Loads and stores of f32 / f16 / bf16 (and masks of lanes) as float registers, for the AVX-512 and
// AVX2 loops of every op. x86-64 with GCC only (isa.h: DROPREG_X86_SIMD).
//
// To float: exact (f16 by F16C, bf16 by a shift). From float: f16 by F16C, bf16 on the bits, each as
// c10's conversions round (docs/numerics.md).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "isa.h"

namespace dropreg {
namespace cpu {

// ---------------------------------------------------------------------------------------------
// AVX-512: 16 lanes, masked.
// ---------------------------------------------------------------------------------------------

// The mask of the first min(left, 16) lanes of a 16-lane register.
DROPREG_AVX512 inline __mmask16 lanes(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

// Lanes [lo, hi) of a 16-lane register, lo and hi clamped to [0, 16].
DROPREG_AVX512 inline __mmask16 lanes_between(int64_t lo, int64_t hi) {
  const int64_t a = lo < 0 ? 0 : (lo > 16 ? 16 : lo);
  const int64_t b = hi < 0 ? 0 : (hi > 16 ? 16 : hi);
  return b <= a ? static_cast<__mmask16>(0) : static_cast<__mmask16>(((1u << b) - 1) & ~((1u << a) - 1));
}

// v's bits plus the rounding increment of bf16 (round to nearest even): the bf16 is the high half.
DROPREG_AVX512 inline __m512i round_bf16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
}

// 16 elements of type scalar_t <-> 16 floats (f32, f16, bf16); `mask` limits the memory access.
template <typename scalar_t>
DROPREG_AVX512 inline __m512 load16(const scalar_t* p, __mmask16 mask) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm512_maskz_loadu_ps(mask, p);
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
  } else {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
}

template <typename scalar_t>
DROPREG_AVX512 inline void store16(scalar_t* p, __m512 v, __mmask16 mask) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    _mm512_mask_storeu_ps(p, mask, v);
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    _mm256_mask_storeu_epi16(p, mask, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    __m512i rounded = _mm512_srli_epi32(round_bf16_bits(v), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
    _mm256_mask_storeu_epi16(p, mask, _mm512_cvtepi32_epi16(rounded));
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2: 8 lanes, whole registers. Without FMA, so that the loops of either AVX2 target inline them.
// ---------------------------------------------------------------------------------------------

// v rounded to bf16 (to nearest even) in the low 16 bits of each 32-bit lane; a NaN keeps the bits
// the rounding made of it.
DROPREG_AVX2_NO_FMA inline __m256i round_bf16_bits(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
}

// 8 values of type scalar_t (f32, f16 or bf16) as floats, exactly.
template <typename scalar_t>
DROPREG_AVX2_NO_FMA inline __m256 load8(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
}

// 8 floats stored as scalar_t, as store16 stores them.
template <typename scalar_t>
DROPREG_AVX2_NO_FMA inline void store8(scalar_t* p, __m256 v) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    _mm256_storeu_ps(p, v);
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    __m256i rounded = round_bf16_bits(v);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
}

}  // namespace cpu
}  // namespace dropreg
