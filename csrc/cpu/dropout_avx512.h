// AVX-512 dropout: Philox on 32 calls at once and the mask applied from the registers, 256 elements
// (32 calls x 8 u16 draws) per step, for f64 / f32 / f16 / bf16, fresh output or in place.
//
// Why intrinsics in target("avx512...") functions and not at::vec::Vectorized: ATen's vector types
// take their width from the CPU_CAPABILITY the translation unit is compiled for, and an extension
// cannot compile one file for AVX-512 without also emitting AVX-512 copies of shared inline
// functions, which the linker may then pick for every caller. Function-level targets confine the
// AVX-512 code to these functions; dropout.cpp calls them only where the CPU has the instructions.
//
// Per step: 10 Philox rounds on four independent sets of 8 calls (one per 64-bit lane, so that
// _mm512_mul_epu32 gives each round's full 64-bit product), a merge into 16-call registers, a 4x4
// transpose of the words within each 128-bit lane (lane L of register r then
// holds call 4L + r's four words, i.e. its 8 u16 in element order), one 16-bit compare per
// register (the keep test), and masked multiplies of the loaded elements (dropped -> +0). Rounding
// to f16 by the F16C instruction (round to nearest even), to bf16 on the bits (round to nearest
// even, NaN -> 0x7FC0), as c10's conversions do.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DROPREG_HAVE_AVX512_DROPOUT 1

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "philox.h"

#define DROPREG_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,f16c,fma")))

namespace dropreg {
namespace cpu {

constexpr int64_t kAvx512StepElems = 32 * kU16PerGroup;  // 256 elements, 32 Philox calls

inline bool cpu_has_avx512_dropout() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c");
}

DROPREG_AVX512 inline __m512i set1_u32(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }

// The state of 8 calls, one per 64-bit lane, in the low 32 bits of each (the high bits are junk
// that no step reads): _mm512_mul_epu32 then gives the whole 64-bit product of a round with no
// shuffles, its high half one shift away and its low half in place.
struct Calls8 {
  __m512i c0, c1, c2, c3;
};

DROPREG_AVX512 inline Calls8 calls8(uint64_t first_call, uint64_t s, int step) {
  const __m512i g = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(first_call)),
                                     _mm512_mullo_epi64(_mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7),
                                                        _mm512_set1_epi64(step)));
  return {g, _mm512_srli_epi64(g, 32), _mm512_set1_epi64(static_cast<long long>(s)),
          _mm512_set1_epi64(static_cast<long long>(s >> 32))};
}

DROPREG_AVX512 inline void round8(Calls8& c, __m512i m0, __m512i m1, __m512i key0, __m512i key1) {
  const __m512i p0 = _mm512_mul_epu32(c.c0, m0);
  const __m512i p1 = _mm512_mul_epu32(c.c2, m1);
  // 0x96: a ^ b ^ c
  c.c0 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p1, 32), c.c1, key0, 0x96);
  c.c1 = p1;
  c.c2 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p0, 32), c.c3, key1, 0x96);
  c.c3 = p0;
}

// Interleaves the even calls' words (low 32 bits of each 64-bit lane) with the odd calls' into one
// register of 16 calls in order.
DROPREG_AVX512 inline __m512i merge_calls(__m512i even, __m512i odd) {
  return _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// Lane L of t[r] := call 4L + r's four words (a 4x4 transpose of 32-bit words in each 128-bit lane).
DROPREG_AVX512 inline void transpose_words(__m512i c0, __m512i c1, __m512i c2, __m512i c3, __m512i* t) {
  const __m512i a0 = _mm512_unpacklo_epi32(c0, c1), a1 = _mm512_unpacklo_epi32(c2, c3);
  const __m512i a2 = _mm512_unpackhi_epi32(c0, c1), a3 = _mm512_unpackhi_epi32(c2, c3);
  t[0] = _mm512_unpacklo_epi64(a0, a1);
  t[1] = _mm512_unpackhi_epi64(a0, a1);
  t[2] = _mm512_unpacklo_epi64(a2, a3);
  t[3] = _mm512_unpackhi_epi64(a2, a3);
}

// The words of calls first_group .. first_group + 31 of stream s, as two transposed sets of 16
// (t[0..3] for the first 16 calls, t[4..7] for the next). Four independent chains of rounds (even
// and odd calls of each set), so that the multiplies of one hide the latency of the others'.
DROPREG_AVX512 inline void philox32(uint64_t seed, uint64_t s, uint64_t first_group, __m512i (&t)[8]) {
  Calls8 c[4] = {calls8(first_group, s, 2), calls8(first_group + 1, s, 2), calls8(first_group + 16, s, 2),
                 calls8(first_group + 17, s, 2)};
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const __m512i key0 = set1_u32(k0), key1 = set1_u32(k1);
    for (int h = 0; h < 4; ++h) round8(c[h], m0, m1, key0, key1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int set = 0; set < 2; ++set) {
    const Calls8& even = c[2 * set];
    const Calls8& odd = c[2 * set + 1];
    transpose_words(merge_calls(even.c0, odd.c0), merge_calls(even.c1, odd.c1), merge_calls(even.c2, odd.c2),
                    merge_calls(even.c3, odd.c3), t + 4 * set);
  }
}

// Keep bits of the 128 elements of 16 calls: bit e of bits[e / 64] for element e.
DROPREG_AVX512 inline void keep_bits(const __m512i* t, uint32_t threshold, uint64_t* bits) {
  const __m512i thr = _mm512_set1_epi16(static_cast<short>(threshold));  // threshold < 2^16 here
  uint32_t m[4];
  for (int r = 0; r < 4; ++r) m[r] = _mm512_cmpge_epu16_mask(t[r], thr);
  // Call g = 4L + r of the 16 owns byte L of m[r]; in element order the calls are 0, 1, ..., 15.
  for (int half = 0; half < 2; ++half) {
    uint64_t word = 0;
    for (int j = 0; j < 8; ++j) {
      const int g = 8 * half + j;
      word |= static_cast<uint64_t>((m[g & 3] >> (8 * (g >> 2))) & 0xFFu) << (8 * j);
    }
    bits[half] = word;
  }
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
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
    _mm256_mask_storeu_epi16(p, mask, _mm512_cvtepi32_epi16(rounded));
  }
}

// y[0..n) = dropout of x[0..n) for the elements whose first index is `first` (a multiple of 256):
// calls first/8 ... of the mask stream. y may be x. threshold < 2^16.
template <typename scalar_t>
DROPREG_AVX512 void dropout_avx512(const scalar_t* x, scalar_t* y, int64_t n, int64_t first, uint32_t threshold,
                                   double scale_d, uint64_t seed, uint64_t offset) {
  const uint64_t s = offset + kStreamDropoutMask;
  for (int64_t base = 0; base < n; base += kAvx512StepElems) {
    __m512i t[8];
    philox32(seed, s, static_cast<uint64_t>(first + base) / kU16PerGroup, t);
    uint64_t bits[4];
    keep_bits(t, threshold, bits);
    keep_bits(t + 4, threshold, bits + 2);
    const int64_t left = n - base;
    if constexpr (std::is_same_v<scalar_t, double>) {
      const __m512d scale = _mm512_set1_pd(scale_d);
      for (int v = 0; v < 32; ++v) {
        const int64_t at = 8 * v;
        if (at >= left) break;
        const __mmask8 in = left - at >= 8 ? 0xFF : static_cast<__mmask8>((1u << (left - at)) - 1);
        const __mmask8 keep = static_cast<__mmask8>(bits[v >> 3] >> (8 * (v & 7)));
        const __m512d xv = _mm512_maskz_loadu_pd(in, x + base + at);
        _mm512_mask_storeu_pd(y + base + at, in, _mm512_maskz_mul_pd(keep, xv, scale));
      }
    } else {
      const __m512 scale = _mm512_set1_ps(static_cast<float>(scale_d));
      for (int v = 0; v < 16; ++v) {
        const int64_t at = 16 * v;
        if (at >= left) break;
        const __mmask16 in = left - at >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (left - at)) - 1);
        const __mmask16 keep = static_cast<__mmask16>(bits[v >> 2] >> (16 * (v & 3)));
        const __m512 xv = load16<scalar_t>(x + base + at, in);
        store16<scalar_t>(y + base + at, _mm512_maskz_mul_ps(keep, xv, scale), in);
      }
    }
  }
}

}  // namespace cpu
}  // namespace dropreg

#else
#define DROPREG_HAVE_AVX512_DROPOUT 0
#endif
