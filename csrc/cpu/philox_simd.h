// Philox4x32-10 on many calls at once from the registers: chains of 8 calls (AVX-512) or 4 calls
// (AVX2), 32 or 16 calls a step, each a hand-written vector twin of philox.h's philox4x32_10, and the words of an arbitrary list
// of calls. x86-64 with GCC only (isa.h: DROPREG_X86_SIMD).
//
// A call's state sits in the low 32 bits of a 64-bit lane (the high bits are junk that no step
// reads): the 32 x 32 -> 64-bit multiply (_mm512_mul_epu32 / _mm256_mul_epu32) then gives a round's
// whole product with no shuffles, its high half one shift away and its low half in place. Four
// independent chains of calls run at once, so that the multiplies of one hide the latency of the
// others'.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "isa.h"
#include "philox.h"

namespace dropreg {
namespace cpu {

// ---------------------------------------------------------------------------------------------
// AVX-512: 8 calls a register, 32 a step.
// ---------------------------------------------------------------------------------------------

DROPREG_AVX512 inline __m512i set1_u32(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }

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

// The ten rounds on kChains chains of 8 calls (32 calls: four chains); its ISA twin at 4 calls a
// register is the AVX2 philox_rounds below.
template <int kChains>
DROPREG_AVX512 inline void philox_rounds(Calls8 (&c)[kChains], uint64_t seed) {
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const __m512i key0 = set1_u32(k0), key1 = set1_u32(k1);
    for (int h = 0; h < kChains; ++h) round8(c[h], m0, m1, key0, key1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// The words of calls first_group .. first_group + 31 of stream s, as two transposed sets of 16
// (t[0..3] for the first 16 calls, t[4..7] for the next): lane L of t[r] holds call 4L + r's four
// words, i.e. its 8 u16 in element order. The chains are the even and odd calls of each set.
// Always inlined: its callers keep t in registers (out of line, the 8 registers go through memory).
DROPREG_AVX512 __attribute__((always_inline)) inline void philox32(uint64_t seed, uint64_t s, uint64_t first_group,
                                                                    __m512i (&t)[8]) {
  Calls8 c[4] = {calls8(first_group, s, 2), calls8(first_group + 1, s, 2), calls8(first_group + 16, s, 2),
                 calls8(first_group + 17, s, 2)};
  philox_rounds(c, seed);
  for (int set = 0; set < 2; ++set) {
    const Calls8& even = c[2 * set];
    const Calls8& odd = c[2 * set + 1];
    transpose_words(merge_calls(even.c0, odd.c0), merge_calls(even.c1, odd.c1), merge_calls(even.c2, odd.c2),
                    merge_calls(even.c3, odd.c3), t + 4 * set);
  }
}

// A chain's 8 calls' words in call order: w[0] = the four words of calls 0..3, w[1] of calls 4..7.
DROPREG_AVX512 inline void chain_words(const Calls8& c, __m512i (&w)[2]) {
  const __m512i low = _mm512_set1_epi64(0xFFFFFFFFll);
  // 64-bit lane j of w01 = (word 0, word 1) of call j, of w23 = (word 2, word 3).
  const __m512i w01 = _mm512_or_si512(_mm512_and_si512(c.c0, low), _mm512_slli_epi64(c.c1, 32));
  const __m512i w23 = _mm512_or_si512(_mm512_and_si512(c.c2, low), _mm512_slli_epi64(c.c3, 32));
  // 128-bit lanes: calls 0, 2, 4, 6 (lo) and 1, 3, 5, 7 (hi); then in call order, 4 calls a register.
  const __m512i lo = _mm512_unpacklo_epi64(w01, w23), hi = _mm512_unpackhi_epi64(w01, w23);
  w[0] = _mm512_permutex2var_epi64(lo, _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), hi);
  w[1] = _mm512_permutex2var_epi64(lo, _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15), hi);
}

// The four words of each of the calls ids[0..count) of stream s, into words[4·k + w] (call k, word
// w): 32 calls a step, from a list of arbitrary call ids.
DROPREG_AVX512 inline void philox_list_avx512(uint64_t seed, uint64_t s, const uint64_t* ids, int64_t count,
                                              uint32_t* words) {
  const __m512i s_lo = _mm512_set1_epi64(static_cast<long long>(s));
  const __m512i s_hi = _mm512_set1_epi64(static_cast<long long>(s >> 32));
  for (int64_t k0 = 0; k0 < count; k0 += 32) {
    Calls8 c[4];
    for (int h = 0; h < 4; ++h) {
      const int64_t left = count - k0 - 8 * h;
      const __mmask8 in = left >= 8 ? 0xFF : (left <= 0 ? 0 : static_cast<__mmask8>((1u << left) - 1));
      const __m512i g = _mm512_maskz_loadu_epi64(in, ids + k0 + 8 * h);
      c[h] = {g, _mm512_srli_epi64(g, 32), s_lo, s_hi};
    }
    philox_rounds(c, seed);
    for (int h = 0; h < 4; ++h) {
      const int64_t left = count - k0 - 8 * h;
      if (left <= 0) break;
      __m512i w[2];
      chain_words(c[h], w);
      uint32_t* out = words + 4 * (k0 + 8 * h);
      const __mmask16 in0 = left >= 4 ? 0xFFFF : static_cast<__mmask16>((1u << (4 * left)) - 1);
      const __mmask16 in1 = left >= 8 ? 0xFFFF : (left <= 4 ? 0 : static_cast<__mmask16>((1u << (4 * (left - 4))) - 1));
      _mm512_mask_storeu_epi32(out, in0, w[0]);
      _mm512_mask_storeu_epi32(out + 16, in1, w[1]);
    }
  }
}

// The words of calls first .. first + 8·kChains - 1 of stream s in call order, words[4·k + w] =
// word w of call first + k: chain h holds the 8 consecutive calls from first + 8h.
template <int kChains>
DROPREG_AVX512 inline void philox_run_avx512(uint64_t seed, uint64_t s, uint64_t first, uint32_t* words) {
  Calls8 c[kChains];
  for (int h = 0; h < kChains; ++h) c[h] = calls8(first + 8 * static_cast<uint64_t>(h), s, 1);
  philox_rounds(c, seed);
  for (int h = 0; h < kChains; ++h) {
    __m512i w[2];
    chain_words(c[h], w);
    _mm512_storeu_si512(words + 32 * h, w[0]);
    _mm512_storeu_si512(words + 32 * h + 16, w[1]);
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2: the AVX-512 Philox above at half the width (its ISA twin): 4 calls a register, 16 a step.
// ---------------------------------------------------------------------------------------------

constexpr int64_t kAvx2StepCalls = 16;

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

// The ten rounds on kChains chains of 4 calls (16 calls: four chains): the AVX-512 philox_rounds'
// ISA twin.
template <int kChains>
DROPREG_AVX2 inline void philox_rounds(Calls4 (&c)[kChains], uint64_t seed) {
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0)), key1 = _mm256_set1_epi32(static_cast<int>(k1));
    for (int h = 0; h < kChains; ++h) round4(c[h], m0, m1, key0, key1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// The draws of calls first .. first + 8·kSets - 1 of stream s (16 calls: kSets = 2): d[j] = the 16
// u16 of calls 2j and 2j + 1, i.e. elements 16j .. 16j + 15 of the step, in order (the u32 of
// elements 8j .. 8j + 7), for j < 4·kSets. Out of line for every caller (its chains fill the 16
// registers: d goes through memory either way).
template <int kSets = 2>
DROPREG_AVX2 __attribute__((noinline)) void philox16(uint64_t seed, uint64_t s, uint64_t first, __m256i (&d)[8]) {
  const __m256i even = _mm256_setr_epi64x(0, 2, 4, 6);
  Calls4 c[2 * kSets];
  for (int h = 0; h < 2 * kSets; ++h) {  // chains: calls first + {0,2,4,6}, + {1,3,5,7}, + {8,...}, + {9,...}
    const uint64_t g = first + static_cast<uint64_t>(8 * (h >> 1) + (h & 1));
    c[h] = calls4(_mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(g)), even), s);
  }
  philox_rounds(c, seed);
  for (int set = 0; set < kSets; ++set) {
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

// philox_list_avx512's contract: words[4·k + w] = word w of call ids[k] of stream s, 16 calls a step.
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
    philox_rounds(c, seed);
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

}  // namespace cpu
}  // namespace dropreg
