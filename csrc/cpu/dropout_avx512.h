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
// even, NaN -> 0x7FC0, as c10's conversions do; the contiguous bf16 path rounds 32 at a time and
// leaves a NaN's bits as the multiply made them, which the NaN policy allows).
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DROPREG_HAVE_AVX512_DROPOUT 1

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "cpu_capability.h"
#include "cpu_kernels.h"
#include "philox.h"

#define DROPREG_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,f16c,fma")))

namespace dropreg {
namespace cpu {

constexpr int64_t kAvx512StepElems = 32 * kU16PerGroup;  // 256 elements, 32 Philox calls

DROPREG_AVX512 inline __m512i set1_u32(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }

// The mask of the first min(left, 16) lanes of a 16-lane register.
DROPREG_AVX512 inline __mmask16 lanes(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

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

// The ten rounds of Philox4x32-10 on 32 calls (four independent chains of 8, so that the multiplies
// of one hide the latency of the others').
DROPREG_AVX512 inline void rounds32(Calls8 (&c)[4], uint64_t seed) {
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const __m512i key0 = set1_u32(k0), key1 = set1_u32(k1);
    for (int h = 0; h < 4; ++h) round8(c[h], m0, m1, key0, key1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// The words of calls first_group .. first_group + 31 of stream s, as two transposed sets of 16
// (t[0..3] for the first 16 calls, t[4..7] for the next). Four independent chains of rounds (even
// and odd calls of each set), so that the multiplies of one hide the latency of the others'.
// Always inlined: its callers keep t in registers (out of line, the 8 registers go through memory).
DROPREG_AVX512 __attribute__((always_inline)) inline void philox32(uint64_t seed, uint64_t s, uint64_t first_group,
                                                                    __m512i (&t)[8]) {
  Calls8 c[4] = {calls8(first_group, s, 2), calls8(first_group + 1, s, 2), calls8(first_group + 16, s, 2),
                 calls8(first_group + 17, s, 2)};
  rounds32(c, seed);
  for (int set = 0; set < 2; ++set) {
    const Calls8& even = c[2 * set];
    const Calls8& odd = c[2 * set + 1];
    transpose_words(merge_calls(even.c0, odd.c0), merge_calls(even.c1, odd.c1), merge_calls(even.c2, odd.c2),
                    merge_calls(even.c3, odd.c3), t + 4 * set);
  }
}

// The four words of each of the calls ids[0..count) of stream s, into words[4·k + w] (call k, word
// w): 32 calls a step in the four chains of philox32, from a list of arbitrary call ids.
DROPREG_AVX512 inline void philox_list(uint64_t seed, uint64_t s, const uint64_t* ids, int64_t count,
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
    rounds32(c, seed);
    const __m512i low = _mm512_set1_epi64(0xFFFFFFFFll);
    const __m512i first4 = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
    const __m512i last4 = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    for (int h = 0; h < 4; ++h) {
      const int64_t left = count - k0 - 8 * h;
      if (left <= 0) break;
      // 64-bit lane j of w01 = (word 0, word 1) of call j, of w23 = (word 2, word 3).
      const __m512i w01 = _mm512_or_si512(_mm512_and_si512(c[h].c0, low), _mm512_slli_epi64(c[h].c1, 32));
      const __m512i w23 = _mm512_or_si512(_mm512_and_si512(c[h].c2, low), _mm512_slli_epi64(c[h].c3, 32));
      // 128-bit lanes: calls 0, 2, 4, 6 (lo) and 1, 3, 5, 7 (hi); then in call order, 4 calls a register.
      const __m512i lo = _mm512_unpacklo_epi64(w01, w23), hi = _mm512_unpackhi_epi64(w01, w23);
      uint32_t* out = words + 4 * (k0 + 8 * h);
      const __mmask16 in0 = left >= 4 ? 0xFFFF : static_cast<__mmask16>((1u << (4 * left)) - 1);
      const __mmask16 in1 = left >= 8 ? 0xFFFF : (left <= 4 ? 0 : static_cast<__mmask16>((1u << (4 * (left - 4))) - 1));
      _mm512_mask_storeu_epi32(out, in0, _mm512_permutex2var_epi64(lo, first4, hi));
      _mm512_mask_storeu_epi32(out + 16, in1, _mm512_permutex2var_epi64(lo, last4, hi));
    }
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

// 32 bf16 at once, for the contiguous dropout: x·scale rounded to bf16 (to nearest even) as two
// registers of the rounded bits (not yet shifted down). Unpacking with zero makes each bf16 the
// high half of a float; the unpack order is undone by the pack in store32_bf16. A NaN keeps its
// sign and payload (quieted by the multiply; its low 16 bits are 0, so the rounding adds no carry):
// the NaN policy leaves those bits free.
struct Bf16Pair {
  __m512i lo, hi;
};

DROPREG_AVX512 inline __m512i round_bf16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
}

DROPREG_AVX512 inline Bf16Pair mul32_bf16(const c10::BFloat16* x, __mmask32 in, __m512 scale) {
  const __m512i raw = _mm512_maskz_loadu_epi16(in, x);
  const __m512i zero = _mm512_setzero_si512();
  const __m512 lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, raw));
  const __m512 hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, raw));
  return {round_bf16_bits(_mm512_mul_ps(lo, scale)), round_bf16_bits(_mm512_mul_ps(hi, scale))};
}

// y[k] = keep bit k ? the rounded product : +0, for the k of `in`.
DROPREG_AVX512 inline void store32_bf16(c10::BFloat16* y, Bf16Pair r, __mmask32 keep, __mmask32 in) {
  const __m512i packed = _mm512_packus_epi32(_mm512_srli_epi32(r.lo, 16), _mm512_srli_epi32(r.hi, 16));
  _mm512_mask_storeu_epi16(y, in, _mm512_maskz_mov_epi16(keep, packed));
}

DROPREG_AVX512 inline __m512i word(const Calls8& c, int q) {
  return q == 0 ? c.c0 : (q == 1 ? c.c1 : (q == 2 ? c.c2 : c.c3));
}

// yr[0..32) = keep ? xr * scale : 0 for the elements of `in` (the others are not touched).
template <typename scalar_t>
DROPREG_AVX512 inline void apply32(const scalar_t* xr, scalar_t* yr, uint32_t keep, __mmask32 in, double scale_d) {
  keep &= in;
  if constexpr (std::is_same_v<scalar_t, double>) {
    const __m512d scale = _mm512_set1_pd(scale_d);
    for (int v = 0; v < 4; ++v) {
      const __mmask8 mem = static_cast<__mmask8>(in >> (8 * v));
      if (mem == 0) break;
      const __m512d xv = _mm512_maskz_loadu_pd(mem, xr + 8 * v);
      _mm512_mask_storeu_pd(yr + 8 * v, mem, _mm512_maskz_mul_pd(static_cast<__mmask8>(keep >> (8 * v)), xv, scale));
    }
  } else {
    const __m512 scale = _mm512_set1_ps(static_cast<float>(scale_d));
    for (int v = 0; v < 2; ++v) {
      const __mmask16 mem = static_cast<__mmask16>(in >> (16 * v));
      if (mem == 0) break;
      const __m512 xv = load16<scalar_t>(xr + 16 * v, mem);
      store16<scalar_t>(yr + 16 * v, _mm512_maskz_mul_ps(static_cast<__mmask16>(keep >> (16 * v)), xv, scale), mem);
    }
  }
}

// Rows of a layout whose memory-innermost dim M is not the logical last dim L (channels_last: M is
// C, L is W), when L's runs are whole calls (its size a multiple of 8). For 8 consecutive l and 32
// consecutive m the 32 calls are first_call + l/8 + m·call_step (one per m), so the rounds run on
// them directly: half h of word q of call m is the draw of (l = 2q + h, m). Word q of 16 calls
// gathered into one register, one 32-bit compare gives the keep bits of rows 2q + 1 (high halves)
// and, after a shift, 2q (low halves) for those 16 m's. The keep bits of 8 rows are made first, then
// the rows are written in memory order (each contiguous along m: one masked multiply per 16
// elements), so a channels_last tensor streams. x and y are element (0, 0); row l is at x + l·x_l,
// y + l·y_l; nl is a multiple of 8; keep has room for 8·ceil(nm / 32) words.
template <typename scalar_t>
DROPREG_AVX512 void dropout_rows_avx512(const scalar_t* x, scalar_t* y, int64_t nl, int64_t nm, int64_t x_l,
                                        int64_t y_l, uint64_t first_call, uint64_t call_step, uint32_t threshold,
                                        double scale, uint64_t seed, uint64_t offset, uint32_t* keep) {
  const uint64_t s = offset + kStreamDropoutMask;
  const __m512i thr_hi = _mm512_set1_epi32(static_cast<int>(threshold << 16));
  // The low 32 bits of each 64-bit lane of two registers: 16 calls' word, in call order.
  const __m512i low_words = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i lane_step = _mm512_mullo_epi64(lane, _mm512_set1_epi64(static_cast<long long>(call_step)));
  const int64_t blocks = (nm + 31) / 32;
  const __mmask32 tail = nm % 32 == 0 ? 0xFFFFFFFFu : static_cast<__mmask32>((1ull << (nm % 32)) - 1);
  const int64_t row_bytes = nm * static_cast<int64_t>(sizeof(scalar_t));
  // Short rows: the hardware prefetcher does not run far enough ahead across the rounds of a
  // group, so x's rows kPrefetchBytes ahead are asked for by hand (long rows stream by themselves).
  const int64_t ahead = row_bytes > 2048 ? 0 : (kPrefetchBytes / row_bytes + 7) / 8 * 8;
  for (int64_t l0 = 0; l0 < nl; l0 += kU16PerGroup) {
    const uint64_t first = first_call + static_cast<uint64_t>(l0) / kU16PerGroup;
    if (ahead > 0) {
      for (int e = 0; e < kU16PerGroup; ++e) {
        const char* row = reinterpret_cast<const char*>(x + (l0 + ahead + e) * x_l);
        for (int64_t at = 0; at < row_bytes; at += 64) _mm_prefetch(row + at, _MM_HINT_T0);
      }
    }
    for (int64_t b = 0; b < blocks; ++b) {
      Calls8 c[4];
      for (int h = 0; h < 4; ++h) {  // the calls of m = 32b + 8h .. 32b + 8h + 7
        const uint64_t g0 = first + static_cast<uint64_t>(32 * b + 8 * h) * call_step;
        const __m512i g = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(g0)), lane_step);
        c[h] = {g, _mm512_srli_epi64(g, 32), _mm512_set1_epi64(static_cast<long long>(s)),
                _mm512_set1_epi64(static_cast<long long>(s >> 32))};
      }
      rounds32(c, seed);
      for (int q = 0; q < 4; ++q) {  // rows l0 + 2q (low halves of word q) and l0 + 2q + 1 (high halves)
        uint32_t rows[2] = {0, 0};
        for (int pair = 0; pair < 2; ++pair) {  // m = 16·pair .. 16·pair + 15: chains 2·pair, 2·pair + 1
          const __m512i words16 = _mm512_permutex2var_epi32(word(c[2 * pair], q), low_words, word(c[2 * pair + 1], q));
          // u16 >= t  <=>  (u16 << 16) >= (t << 16) as 32-bit words, whatever lies below.
          rows[1] |= static_cast<uint32_t>(_mm512_cmpge_epu32_mask(words16, thr_hi)) << (16 * pair);
          rows[0] |= static_cast<uint32_t>(_mm512_cmpge_epu32_mask(_mm512_slli_epi32(words16, 16), thr_hi))
                     << (16 * pair);
        }
        keep[(2 * q) * blocks + b] = rows[0];
        keep[(2 * q + 1) * blocks + b] = rows[1];
      }
    }
    for (int e = 0; e < kU16PerGroup; ++e) {
      const scalar_t* xr = x + (l0 + e) * x_l;
      scalar_t* yr = y + (l0 + e) * y_l;
      for (int64_t b = 0; b < blocks; ++b) {
        apply32<scalar_t>(xr + 32 * b, yr + 32 * b, keep[e * blocks + b], b + 1 < blocks ? 0xFFFFFFFFu : tail, scale);
      }
    }
  }
}

// y[0..n) = dropout of x[0..n) with draws u16[0..n) (a tile's, laid out in memory order): one
// 16-bit compare and one masked multiply per 16 elements (8 for f64). y may be x. threshold < 2^16.
template <typename scalar_t>
DROPREG_AVX512 void apply_u16_avx512(const scalar_t* x, scalar_t* y, const uint16_t* u16, int64_t n,
                                     uint32_t threshold, double scale_d) {
  const __m256i thr = _mm256_set1_epi16(static_cast<short>(threshold));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 in = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __mmask16 keep = _mm256_mask_cmpge_epu16_mask(in, _mm256_maskz_loadu_epi16(in, u16 + i), thr);
    if constexpr (std::is_same_v<scalar_t, double>) {
      const __m512d scale = _mm512_set1_pd(scale_d);
      for (int v = 0; v < 2; ++v) {
        const __mmask8 mem = static_cast<__mmask8>(in >> (8 * v));
        const __m512d xv = _mm512_maskz_loadu_pd(mem, x + i + 8 * v);
        _mm512_mask_storeu_pd(y + i + 8 * v, mem, _mm512_maskz_mul_pd(static_cast<__mmask8>(keep >> (8 * v)), xv, scale));
      }
    } else {
      const __m512 scale = _mm512_set1_ps(static_cast<float>(scale_d));
      store16<scalar_t>(y + i, _mm512_maskz_mul_ps(keep, load16<scalar_t>(x + i, in), scale), in);
    }
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
    } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      const __m512 scale = _mm512_set1_ps(static_cast<float>(scale_d));
      for (int v = 0; v < 8; ++v) {
        const int64_t at = 32 * v;
        if (at >= left) break;
        const __mmask32 in = left - at >= 32 ? 0xFFFFFFFFu : static_cast<__mmask32>((1ull << (left - at)) - 1);
        const __mmask32 keep = static_cast<__mmask32>(bits[v >> 1] >> (32 * (v & 1)));
        store32_bf16(y + base + at, mul32_bf16(x + base + at, in, scale), keep, in);
      }
    } else {
      const __m512 scale = _mm512_set1_ps(static_cast<float>(scale_d));
      for (int v = 0; v < 16; ++v) {
        const int64_t at = 16 * v;
        if (at >= left) break;
        const __mmask16 in = lanes(left - at);
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
