// Building blocks of the CPU kernels (CPU only; the CUDA kernels have their own loops).
//
// - philox_block: the words of 32 consecutive Philox calls, vectorized across the calls.
// - vexp_inplace / vlog_inplace: float exp/log over a small array with SLEEF's u10 functions, the
//   ones torch.exp/torch.log use on the CPU (exported by libtorch_cpu), so our values match the
//   reference bit for bit on the same CPU capability; a plain libm loop where AVX2 is missing.
#pragma once

#include <cmath>
#include <cstdint>

#include "philox.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DROPREG_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define DROPREG_X86_SLEEF 1
#include <immintrin.h>  // x86 only: a non-x86 build takes the plain loops below
#else
#define DROPREG_CPU_CLONES
#define DROPREG_X86_SLEEF 0
#endif

namespace dropreg {
namespace cpu {

constexpr int64_t kBlockGroups = 32;                // Philox calls per block
constexpr int64_t kBlockWords = 4 * kBlockGroups;   // 32-bit words per block (128)
constexpr int64_t kBlockElems = kBlockWords;        // elements per block at the u32 (Gumbel) density
// How far ahead a streamed input is prefetched by hand, where the loop between its loads is long
// enough that the hardware prefetcher falls behind (dropout's short rows, the CE loops' z).
constexpr int64_t kPrefetchBytes = 8192;
// Partial sums of the fixed-order reductions (cross-entropy's Σ exp, the site penalty's chunks):
// element k of a block adds to partial k % kSumLanes, one AVX-512 register of floats.
constexpr int kSumLanes = 16;

// u[w] = word w % 4 of group first_group + w / 4 of `stream`, w < kBlockWords (at the u32 density,
// u32 of element 4·first_group + w). The rounds run over
// structure-of-arrays counters with the group loop innermost, so the compiler vectorizes across
// groups (they share the key schedule); the four words are then interleaved.
static DROPREG_CPU_CLONES void philox_block(uint64_t seed, uint64_t offset, uint64_t stream,
                                            uint64_t first_group, uint32_t* __restrict__ u) {
  uint32_t c0[kBlockGroups], c1[kBlockGroups], c2[kBlockGroups], c3[kBlockGroups];
  const uint64_t s = offset + stream;
  for (int64_t j = 0; j < kBlockGroups; ++j) {
    const uint64_t g = first_group + static_cast<uint64_t>(j);
    c0[j] = static_cast<uint32_t>(g);
    c1[j] = static_cast<uint32_t>(g >> 32);
    c2[j] = static_cast<uint32_t>(s);
    c3[j] = static_cast<uint32_t>(s >> 32);
  }
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int64_t j = 0; j < kBlockGroups; ++j) philox_round(c0[j], c1[j], c2[j], c3[j], k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int64_t j = 0; j < kBlockGroups; ++j) {
    u[4 * j] = c0[j];
    u[4 * j + 1] = c1[j];
    u[4 * j + 2] = c2[j];
    u[4 * j + 3] = c3[j];
  }
}

#if DROPREG_X86_SLEEF
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
extern "C" {
__m512 Sleef_expf16_u10(__m512);
__m512 Sleef_logf16_u10(__m512);
__m256 Sleef_expf8_u10(__m256);
__m256 Sleef_logf8_u10(__m256);
}

// Whole vectors go through SLEEF; the tail is padded into a full vector (as ATen's Vectorized
// does), so every element sees the same function.
#define DROPREG_SLEEF_ARRAY(NAME, TARGET, VEC, WIDTH, LOAD, STORE, FN)      \
  __attribute__((target(TARGET))) static void NAME(float* x, int64_t n) { \
    int64_t i = 0;                                                       \
    for (; i + WIDTH <= n; i += WIDTH) STORE(x + i, FN(LOAD(x + i)));     \
    if (i < n) {                                                         \
      alignas(64) float tail[WIDTH] = {};                                \
      for (int64_t j = 0; i + j < n; ++j) tail[j] = x[i + j];            \
      STORE(tail, FN(LOAD(tail)));                                       \
      for (int64_t j = 0; i + j < n; ++j) x[i + j] = tail[j];            \
    }                                                                    \
  }

DROPREG_SLEEF_ARRAY(vexp_avx512, "avx512f", __m512, 16, _mm512_loadu_ps, _mm512_storeu_ps, Sleef_expf16_u10)
DROPREG_SLEEF_ARRAY(vlog_avx512, "avx512f", __m512, 16, _mm512_loadu_ps, _mm512_storeu_ps, Sleef_logf16_u10)
DROPREG_SLEEF_ARRAY(vexp_avx2, "avx2,fma", __m256, 8, _mm256_loadu_ps, _mm256_storeu_ps, Sleef_expf8_u10)
DROPREG_SLEEF_ARRAY(vlog_avx2, "avx2,fma", __m256, 8, _mm256_loadu_ps, _mm256_storeu_ps, Sleef_logf8_u10)
#undef DROPREG_SLEEF_ARRAY
#pragma GCC diagnostic pop
#endif

inline void vexp_scalar(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

inline void vlog_scalar(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::log(x[i]);
}

using ArrayFn = void (*)(float*, int64_t);

// The widest SLEEF variant this CPU runs, the order torch itself prefers (AVX-512, AVX2, none).
inline ArrayFn pick(ArrayFn avx512, ArrayFn avx2, ArrayFn scalar) {
#if DROPREG_X86_SLEEF
  if (__builtin_cpu_supports("avx512f")) return avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return avx2;
#endif
  (void)avx512;
  (void)avx2;
  return scalar;
}

// x[i] = exp(x[i]) / log(x[i]) for i < n.
inline void vexp_inplace(float* x, int64_t n) {
#if DROPREG_X86_SLEEF
  static const ArrayFn fn = pick(vexp_avx512, vexp_avx2, vexp_scalar);
#else
  static const ArrayFn fn = vexp_scalar;
#endif
  fn(x, n);
}

inline void vlog_inplace(float* x, int64_t n) {
#if DROPREG_X86_SLEEF
  static const ArrayFn fn = pick(vlog_avx512, vlog_avx2, vlog_scalar);
#else
  static const ArrayFn fn = vlog_scalar;
#endif
  fn(x, n);
}

inline void vexp_inplace(double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

inline void vlog_inplace(double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::log(x[i]);
}

}  // namespace cpu
}  // namespace dropreg
