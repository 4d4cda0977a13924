// AVX2 dropout: the AVX-512 loops' scheme (dropout_avx512.h) at half the width, for the CPUs that
// have AVX2 + FMA + F16C and no AVX-512. Philox on 16 calls at once and the mask applied from the
// registers, 128 elements (16 calls x 8 u16 draws) per step, for f64 / f32 / f16 / bf16, fresh
// output or in place; plus the draws of an arbitrary list of calls and the apply from draws in
// memory, for the strided walk. Function-level targets, for the reason dropout_avx512.h gives.
//
// Per step: 10 Philox rounds on four independent chains of 4 calls (one per 64-bit lane, so that
// _mm256_mul_epu32 gives each round's full 64-bit product), a merge of even and odd calls into
// 8-call registers, a 4x4 transpose of the words within each 128-bit lane and a swap of lanes, so
// that each register holds two calls' 16 draws in element order. AVX2 has no unsigned 16-bit
// compare: u16 >= t is max(u16, t) == u16. The 16-bit keep masks are sign-extended to the element
// width and ANDed with the products (dropped -> +0). Rounding to f16 by F16C (to nearest even), to
// bf16 on the bits (to nearest even; a NaN keeps the bits the multiply made, as on AVX-512).
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DROPREG_HAVE_AVX2_DROPOUT 1

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "cpu_capability.h"
#include "dropout.h"
#include "philox.h"

#define DROPREG_AVX2 __attribute__((target("avx2,f16c,fma")))
// Without FMA: for loops whose products and sums must each be rounded (GCC contracts a vector a·b + c
// into an FMA where the target has one), and for helpers that any AVX2 loop may inline.
#define DROPREG_AVX2_NO_FMA __attribute__((target("avx2,f16c")))

namespace dropreg {
namespace cpu {

constexpr int64_t kAvx2StepCalls = 16;
constexpr int64_t kAvx2StepElems = kAvx2StepCalls * kU16PerGroup;  // 128 elements

// The state of 4 calls, one per 64-bit lane, in the low 32 bits of each (the high bits are junk no
// step reads), as Calls8 in dropout_avx512.h.
struct Calls4 {
  __m256i c0, c1, c2, c3;
};

DROPREG_AVX2 inline Calls4 calls4(__m256i groups, uint64_t s) {
  return {groups, _mm256_srli_epi64(groups, 32), _mm256_set1_epi64x(static_cast<long long>(s)),
          _mm256_set1_epi64x(static_cast<long long>(s >> 32))};
}

DROPREG_AVX2 inline void round4(Calls4& c, __m256i m0, __m256i m1, __m256i key0, __m256i key1) {
  const __m256i p0 = _mm256_mul_epu32(c.c0, m0);
  const __m256i p1 = _mm256_mul_epu32(c.c2, m1);
  c.c0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), c.c1), key0);
  c.c1 = p1;
  c.c2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), c.c3), key1);
  c.c3 = p0;
}

// The ten rounds of Philox4x32-10 on 16 calls (four independent chains, so that the multiplies of
// one hide the latency of the others').
DROPREG_AVX2 inline void rounds16(Calls4 (&c)[4], uint64_t seed) {
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0)), key1 = _mm256_set1_epi32(static_cast<int>(k1));
    for (int h = 0; h < 4; ++h) round4(c[h], m0, m1, key0, key1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// The draws of calls first .. first + 15 of stream s: d[j] = the 16 u16 of calls 2j and 2j + 1,
// i.e. elements 16j .. 16j + 15 of the step, in order.
DROPREG_AVX2 inline void philox16(uint64_t seed, uint64_t s, uint64_t first, __m256i (&d)[8]) {
  const __m256i even = _mm256_setr_epi64x(0, 2, 4, 6);
  Calls4 c[4];
  for (int h = 0; h < 4; ++h) {  // chains: calls first + {0,2,4,6}, + {1,3,5,7}, + {8,...}, + {9,...}
    const uint64_t g = first + static_cast<uint64_t>(8 * (h >> 1) + (h & 1));
    c[h] = calls4(_mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(g)), even), s);
  }
  rounds16(c, seed);
  for (int set = 0; set < 2; ++set) {
    const Calls4& ev = c[2 * set];
    const Calls4& od = c[2 * set + 1];
    // w[q]: word q of the set's 8 calls, in call order (even calls' low words, odd calls' shifted up).
    const __m256i w0 = _mm256_blend_epi32(ev.c0, _mm256_slli_epi64(od.c0, 32), 0xAA);
    const __m256i w1 = _mm256_blend_epi32(ev.c1, _mm256_slli_epi64(od.c1, 32), 0xAA);
    const __m256i w2 = _mm256_blend_epi32(ev.c2, _mm256_slli_epi64(od.c2, 32), 0xAA);
    const __m256i w3 = _mm256_blend_epi32(ev.c3, _mm256_slli_epi64(od.c3, 32), 0xAA);
    // 4x4 transpose in each 128-bit lane: lane L of t[r] := call 4L + r's four words.
    const __m256i a0 = _mm256_unpacklo_epi32(w0, w1), a1 = _mm256_unpacklo_epi32(w2, w3);
    const __m256i a2 = _mm256_unpackhi_epi32(w0, w1), a3 = _mm256_unpackhi_epi32(w2, w3);
    const __m256i t0 = _mm256_unpacklo_epi64(a0, a1), t1 = _mm256_unpackhi_epi64(a0, a1);
    const __m256i t2 = _mm256_unpacklo_epi64(a2, a3), t3 = _mm256_unpackhi_epi64(a2, a3);
    d[4 * set + 0] = _mm256_permute2x128_si256(t0, t1, 0x20);  // calls 0, 1
    d[4 * set + 1] = _mm256_permute2x128_si256(t2, t3, 0x20);  // calls 2, 3
    d[4 * set + 2] = _mm256_permute2x128_si256(t0, t1, 0x31);  // calls 4, 5
    d[4 * set + 3] = _mm256_permute2x128_si256(t2, t3, 0x31);  // calls 6, 7
  }
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

// The four words of each of the calls ids[0..count) of stream s, into words[4·k + w] (call k, word
// w): 16 calls a step, from a list of arbitrary call ids.
DROPREG_AVX2 inline void philox_list_avx2(uint64_t seed, uint64_t s, const uint64_t* ids, int64_t count,
                                          uint32_t* words) {
  for (int64_t k0 = 0; k0 < count; k0 += kAvx2StepCalls) {
    const int64_t n = count - k0 < kAvx2StepCalls ? count - k0 : kAvx2StepCalls;
    alignas(32) uint64_t padded[kAvx2StepCalls] = {};
    const uint64_t* step_ids = ids + k0;
    if (n < kAvx2StepCalls) {
      for (int64_t k = 0; k < n; ++k) padded[k] = ids[k0 + k];
      step_ids = padded;
    }
    Calls4 c[4];
    for (int h = 0; h < 4; ++h) {
      c[h] = calls4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(step_ids + 4 * h)), s);
    }
    rounds16(c, seed);
    alignas(32) uint32_t tail[4 * kAvx2StepCalls];
    uint32_t* out = n < kAvx2StepCalls ? tail : words + 4 * k0;
    const __m256i low = _mm256_set1_epi64x(0xFFFFFFFFll);
    for (int h = 0; h < 4; ++h) {
      // 64-bit lane j of w01 = (word 0, word 1) of call j, of w23 = (word 2, word 3).
      const __m256i w01 = _mm256_or_si256(_mm256_and_si256(c[h].c0, low), _mm256_slli_epi64(c[h].c1, 32));
      const __m256i w23 = _mm256_or_si256(_mm256_and_si256(c[h].c2, low), _mm256_slli_epi64(c[h].c3, 32));
      const __m256i lo = _mm256_unpacklo_epi64(w01, w23), hi = _mm256_unpackhi_epi64(w01, w23);  // calls 0|2, 1|3
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * h), _mm256_permute2x128_si256(lo, hi, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * h + 8), _mm256_permute2x128_si256(lo, hi, 0x31));
    }
    if (out == tail) {
      for (int64_t w = 0; w < 4 * n; ++w) words[4 * k0 + w] = tail[w];
    }
  }
}

// All ones in the 16-bit lanes whose draw keeps its element (u16 >= threshold, threshold < 2^16).
DROPREG_AVX2 inline __m256i keep16(__m256i draws, __m256i threshold) {
  return _mm256_cmpeq_epi16(_mm256_max_epu16(draws, threshold), draws);
}

DROPREG_AVX2 inline __m256i round_bf16_bits(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
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

#else
#define DROPREG_HAVE_AVX2_DROPOUT 0
#endif
