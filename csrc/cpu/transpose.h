// The draws of a tile of the strided dropout walk (dropout.cpp), transposed into memory order.
#pragma once

#include <cstdint>

#if defined(__SSE2__)
#include <emmintrin.h>  // x86-64's baseline
#endif

namespace dropreg {
namespace cpu {

// out[l·nm + m] = runs[m][l] for m < nm, l < nl: the draws of nm runs along L, in memory order.
// 8 x 8 blocks by three rounds of SSE2 unpacks (24 shuffles for 64 draws), the edges one by one.
inline void transpose_u16(const uint16_t* const* runs, int64_t nm, int64_t nl, uint16_t* out) {
  int64_t m0 = 0;
#if defined(__SSE2__)
  for (; m0 + 8 <= nm; m0 += 8) {
    const uint16_t* const* r = runs + m0;
    int64_t l0 = 0;
    for (; l0 + 8 <= nl; l0 += 8) {
      __m128i v[8], t[8];
      for (int i = 0; i < 8; ++i) v[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[i] + l0));
      for (int i = 0; i < 4; ++i) {  // pairs of rows, interleaved by 16 bits
        t[i] = _mm_unpacklo_epi16(v[2 * i], v[2 * i + 1]);
        t[i + 4] = _mm_unpackhi_epi16(v[2 * i], v[2 * i + 1]);
      }
      // t[0..3]: columns 0-3 of row pairs (0,1) .. (6,7); t[4..7]: columns 4-7
      for (int h = 0; h < 2; ++h) {
        const __m128i* q = t + 4 * h;
        const __m128i a0 = _mm_unpacklo_epi32(q[0], q[1]), a1 = _mm_unpackhi_epi32(q[0], q[1]);
        const __m128i b0 = _mm_unpacklo_epi32(q[2], q[3]), b1 = _mm_unpackhi_epi32(q[2], q[3]);
        uint16_t* o = out + (l0 + 4 * h) * nm + m0;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm_unpacklo_epi64(a0, b0));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o + nm), _mm_unpackhi_epi64(a0, b0));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 2 * nm), _mm_unpacklo_epi64(a1, b1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 3 * nm), _mm_unpackhi_epi64(a1, b1));
      }
    }
    for (int64_t m = m0; m < m0 + 8; ++m) {
      for (int64_t l = l0; l < nl; ++l) out[l * nm + m] = runs[m][l];
    }
  }
#endif
  for (int64_t m = m0; m < nm; ++m) {
    for (int64_t l = 0; l < nl; ++l) out[l * nm + m] = runs[m][l];
  }
}

}  // namespace cpu
}  // namespace dropreg
