// x[i] = exp(x[i]) or log(x[i]) over a small array, per ISA. float: SLEEF's u10 functions at the
// row's width, the ones torch.exp / torch.log run on such a CPU (exported by libtorch_cpu), so the
// values are the reference's bit for bit on the same CPU; libm in the portable row. double: libm.
#pragma once

#include <cmath>
#include <cstdint>

#include "isa.h"

#if DROPREG_X86_SIMD
#include <immintrin.h>
#endif

namespace dropreg {
namespace cpu {

using ArrayFn = void (*)(float*, int64_t);

template <typename T>
void exp_libm(T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

template <typename T>
void log_libm(T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::log(x[i]);
}

#if DROPREG_X86_SIMD
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
extern "C" {
__m512 Sleef_expf16_u10(__m512);
__m512 Sleef_logf16_u10(__m512);
__m256 Sleef_expf8_u10(__m256);
__m256 Sleef_logf8_u10(__m256);
}

// Whole vectors go through SLEEF; the tail is padded into a full vector (as ATen's Vectorized
// does), so every element sees the same function. Hidden: called directly, not through the PLT.
#define DROPREG_SLEEF_ARRAY(NAME, TARGET, WIDTH, LOAD, STORE, FN)                               \
  __attribute__((visibility("hidden"), target(TARGET))) inline void NAME(float* x, int64_t n) { \
    int64_t i = 0;                                                                              \
    for (; i + WIDTH <= n; i += WIDTH) STORE(x + i, FN(LOAD(x + i)));                           \
    if (i < n) {                                                                                \
      alignas(64) float tail[WIDTH] = {};                                                       \
      for (int64_t j = 0; i + j < n; ++j) tail[j] = x[i + j];                                   \
      STORE(tail, FN(LOAD(tail)));                                                              \
      for (int64_t j = 0; i + j < n; ++j) x[i + j] = tail[j];                                   \
    }                                                                                           \
  }

DROPREG_SLEEF_ARRAY(exp_avx512, "avx512f", 16, _mm512_loadu_ps, _mm512_storeu_ps, Sleef_expf16_u10)
DROPREG_SLEEF_ARRAY(log_avx512, "avx512f", 16, _mm512_loadu_ps, _mm512_storeu_ps, Sleef_logf16_u10)
DROPREG_SLEEF_ARRAY(exp_avx2, "avx2,fma", 8, _mm256_loadu_ps, _mm256_storeu_ps, Sleef_expf8_u10)
DROPREG_SLEEF_ARRAY(log_avx2, "avx2,fma", 8, _mm256_loadu_ps, _mm256_storeu_ps, Sleef_logf8_u10)
#undef DROPREG_SLEEF_ARRAY
#pragma GCC diagnostic pop
#endif

// The table: each ISA's float exp and log.
struct ExpLog {
  ArrayFn exp;
  ArrayFn log;
};

template <Isa isa>
constexpr ExpLog kExpLog{&exp_libm<float>, &log_libm<float>};
#if DROPREG_X86_SIMD
template <>
constexpr ExpLog kExpLog<Isa::kAvx2>{&exp_avx2, &log_avx2};
template <>
constexpr ExpLog kExpLog<Isa::kAvx512>{&exp_avx512, &log_avx512};
#endif

template <Isa isa>
void vexp(float* x, int64_t n) {
  note_entry(CpuOp::kExpLog, isa);
  kExpLog<isa>.exp(x, n);
}

template <Isa isa>
void vlog(float* x, int64_t n) {
  note_entry(CpuOp::kExpLog, isa);
  kExpLog<isa>.log(x, n);
}

template <Isa isa>
void vexp(double* x, int64_t n) {
  exp_libm(x, n);
}

template <Isa isa>
void vlog(double* x, int64_t n) {
  log_libm(x, n);
}

}  // namespace cpu
}  // namespace dropreg
