// AVX-512 dropout: Philox on 32 calls at once and the mask applied from the registers, 256 elements
// (32 calls x 8 u16 draws) per step, for f64 / f32 / f16 / bf16, fresh output or in place; the rows
// of a channels_last tile and the apply from draws in memory for the strided walk. Intrinsics in
// functions with a target attribute, not at::vec::Vectorized (isa.h says why).
//
// Per step: philox32 (philox_simd.h) leaves lane L of register r holding call 4L + r's four words,
// i.e. its 8 u16 in element order; one 16-bit compare per register gives the keep bits, and masked
// multiplies of the loaded elements write the kept ones (dropped -> +0). Rounding as
// load_store_simd.h's; the contiguous bf16 path rounds 32 at a time and leaves a NaN's bits as the
// multiply made them, which the NaN policy allows (docs/numerics.md).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "blocks.h"
#include "isa.h"
#include "load_store_simd.h"
#include "philox.h"
#include "philox_simd.h"

namespace dropreg {
namespace cpu {

constexpr int64_t kAvx512StepElems = 32 * kU16PerGroup;  // 256 elements, 32 Philox calls

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

// 32 bf16 at once, for the contiguous dropout: x·scale rounded to bf16 (to nearest even) as two
// registers of the rounded bits (not yet shifted down). Unpacking with zero makes each bf16 the
// high half of a float; the unpack order is undone by the pack in store32_bf16. A NaN keeps its
// sign and payload (quieted by the multiply; its low 16 bits are 0, so the rounding adds no carry):
// the NaN policy leaves those bits free.
struct Bf16Pair {
  __m512i lo, hi;
};

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
      philox_rounds(c, seed);
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
template <typename scalar_t, typename acc_t>
DROPREG_AVX512 void apply_u16_avx512(const scalar_t* x, scalar_t* y, const uint16_t* u16, int64_t n,
                                     uint32_t threshold, acc_t scale_acc) {
  const double scale_d = static_cast<double>(scale_acc);
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
template <typename scalar_t, typename acc_t>
DROPREG_AVX512 void dropout_avx512(const scalar_t* x, scalar_t* y, int64_t n, int64_t first, uint32_t threshold,
                                   acc_t scale_acc, uint64_t seed, uint64_t offset) {
  const double scale_d = static_cast<double>(scale_acc);
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
