// The CPU dispatch tables: for each op, the vector loops of each ISA's row (isa.h chooses the row
// once per process, honouring DROPREG_CPU_CAPABILITY). An empty entry means the op's portable loop
// (beside its caller in the op's .cpp) runs in that row, compiled for the row's ISA where the
// compiler vectorizes it (isa.h: compiled_for); the portable row is empty. Each op records the row
// it ran (isa.h: note_entry). docs/cpu_backend.md describes the tables.
#pragma once

#include <cstdint>

#include "cross_entropy_row.h"
#include "isa.h"

#if DROPREG_X86_SIMD
#include "cross_entropy_avx2.h"
#include "cross_entropy_avx512.h"
#include "dropout_avx2.h"
#include "dropout_avx512.h"
#include "philox_simd.h"
#include "site_penalty_avx2.h"
#include "site_penalty_avx512.h"
#endif

namespace dropreg {
namespace cpu {

// A row's entry, or `portable` where the row has none.
template <typename Fn>
constexpr Fn entry_or(Fn entry, Fn portable) {
  return entry != nullptr ? entry : portable;
}

// words[4·k + w] = word w of call ids[k] of stream s, k < count.
using PhiloxListFn = void (*)(uint64_t seed, uint64_t s, const uint64_t* ids, int64_t count, uint32_t* words);

// ---------------------------------------------------------------------------------------------
// dropout (dropout.cpp). threshold = 2^16 (drop everything) fits no 16-bit compare: the portable
// loops, compiled for the row's ISA, take it in every row.
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
struct DropoutLoops {
  // y[0..n) = dropout of x[0..n) for the elements from `first` (a multiple of `step`). y may be x.
  void (*run)(const scalar_t* x, scalar_t* y, int64_t n, int64_t first, uint32_t threshold, acc_t scale,
              uint64_t seed, uint64_t offset) = nullptr;
  int64_t step = 0;
  PhiloxListFn words = nullptr;  // the strided walk's draws
  // y[0..n) = dropout of x[0..n) with draws u16[0..n), unit strides (the strided walk's tiles).
  void (*apply_u16)(const scalar_t* x, scalar_t* y, const uint16_t* u16, int64_t n, uint32_t threshold,
                    acc_t scale) = nullptr;
  // A channels_last tile's rows from the registers (dropout_avx512.h: dropout_rows_avx512).
  void (*rows)(const scalar_t* x, scalar_t* y, int64_t nl, int64_t nm, int64_t x_l, int64_t y_l, uint64_t first_call,
               uint64_t call_step, uint32_t threshold, double scale, uint64_t seed, uint64_t offset,
               uint32_t* keep) = nullptr;
};

template <Isa isa, typename scalar_t, typename acc_t>
constexpr DropoutLoops<scalar_t, acc_t> kDropoutLoops{};

// ---------------------------------------------------------------------------------------------
// cross-entropy (cross_entropy.cpp): float accumulation only (f64 logits: the portable loops).
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
struct CrossEntropyLoops {
  // A 128-element block of the sample pass (cross_entropy_avx512.h: sample_block_avx512).
  int64_t (*sample_block)(const scalar_t* z, int64_t lo, int64_t hi, RowState<acc_t>& st, uint64_t seed,
                          uint64_t stream, uint64_t first_call, acc_t* e_out, uint16_t* h, int32_t* cand) = nullptr;
  // g[k] = (e[k]·f - [k == y])·s over a block's offsets [lo, hi).
  void (*scale_block)(const acc_t* e, int64_t lo, int64_t hi, acc_t f, int64_t y, acc_t s, scalar_t* g) = nullptr;
  // ce_grad's row: g[k] = (exp(z[k] - l) - [k == y])·s.
  void (*grad_row)(const scalar_t* z, int64_t n, acc_t l, int64_t y, acc_t s, scalar_t* g) = nullptr;
  // The backwards' first pass: p = exp(z - l), w = u_g + s·u_t, partial[k % 16] += p[k]·w[k].
  void (*softmax_dot2_row)(const scalar_t* z, const scalar_t* u_g, const scalar_t* u_t, acc_t s, int64_t n, acc_t l,
                           acc_t* p, acc_t* w, double* partial) = nullptr;
  // ce_grad_backward's second pass: g[k] = s·p[k]·(u[k] - pu).
  void (*softmax_vjp_row)(const acc_t* p, const acc_t* u, int64_t n, acc_t pu, acc_t s, scalar_t* g) = nullptr;
  // cross_entropy_sample_grad_backward's: g[k] = p[k]·(w[k] - pw) + gl·(p[k] - [k == y]).
  void (*softmax_vjp2_row)(const acc_t* p, const acc_t* w, int64_t n, acc_t pw, acc_t gl, int64_t y,
                           scalar_t* g) = nullptr;
};

template <Isa isa, typename scalar_t, typename acc_t>
constexpr CrossEntropyLoops<scalar_t, acc_t> kCrossEntropyLoops{};

// ---------------------------------------------------------------------------------------------
// site penalty (site_penalty.cpp): float accumulation and a 16-bit threshold only.
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
struct SitePenaltyLoops {
  int64_t chunk_multiple = 1;  // the loops take chunks whose length is a multiple of this
  PhiloxListFn words = nullptr;  // a chunk's η words
  // A chunk's Σ (g_e h)² and Σ g_i η h (ge / gi may be null: that sum is 0).
  void (*sums)(const scalar_t* h, const scalar_t* ge, const scalar_t* gi, int64_t m, const uint32_t* u,
               bool rademacher, acc_t amplitude, acc_t negative, uint32_t threshold, acc_t* explicit_sum,
               acc_t* implicit_sum) = nullptr;
  // A chunk's dh, dg_e, dg_i.
  void (*backward)(acc_t a2, acc_t b, const scalar_t* h, const scalar_t* ge, const scalar_t* gi, int64_t m,
                   const uint32_t* u, bool rademacher, acc_t amplitude, acc_t negative, uint32_t threshold,
                   scalar_t* dh, scalar_t* dge, scalar_t* dgi) = nullptr;
};

template <Isa isa, typename scalar_t, typename acc_t>
constexpr SitePenaltyLoops<scalar_t, acc_t> kSitePenaltyLoops{};

// ---------------------------------------------------------------------------------------------
// The AVX2 and AVX-512 rows. Each AVX2 loop is the AVX-512 one at half the width (its ISA twin).
// ---------------------------------------------------------------------------------------------
#if DROPREG_X86_SIMD
template <typename scalar_t, typename acc_t>  // dropout, AVX2: 128 elements (16 calls) a step
constexpr DropoutLoops<scalar_t, acc_t> kDropoutLoops<Isa::kAvx2, scalar_t, acc_t>{
    &dropout_avx2<scalar_t, acc_t>, kAvx2StepElems, &philox_list_avx2, &apply_u16_avx2<scalar_t, acc_t>, nullptr};
template <typename scalar_t, typename acc_t>  // dropout, AVX-512: 256 elements (32 calls) a step; rows
constexpr DropoutLoops<scalar_t, acc_t> kDropoutLoops<Isa::kAvx512, scalar_t, acc_t>{
    &dropout_avx512<scalar_t, acc_t>, kAvx512StepElems, &philox_list_avx512, &apply_u16_avx512<scalar_t, acc_t>,
    &dropout_rows_avx512<scalar_t>};

template <typename scalar_t>  // cross-entropy, AVX2: every loop
constexpr CrossEntropyLoops<scalar_t, float> kCrossEntropyLoops<Isa::kAvx2, scalar_t, float>{
    &sample_block_avx2<scalar_t>,     &scale_block_avx2<scalar_t>,     &grad_row_avx2<scalar_t>,
    &softmax_dot2_row_avx2<scalar_t>, &softmax_vjp_row_avx2<scalar_t>, &softmax_vjp2_row_avx2<scalar_t>};
template <typename scalar_t>  // cross-entropy, AVX-512: every loop
constexpr CrossEntropyLoops<scalar_t, float> kCrossEntropyLoops<Isa::kAvx512, scalar_t, float>{
    &sample_block_avx512<scalar_t>,     &scale_block_avx512<scalar_t>,     &grad_row_avx512<scalar_t>,
    &softmax_dot2_row_avx512<scalar_t>, &softmax_vjp_row_avx512<scalar_t>, &softmax_vjp2_row_avx512<scalar_t>};

template <typename scalar_t>  // site penalty, AVX2: chunks of whole 16-element steps
constexpr SitePenaltyLoops<scalar_t, float> kSitePenaltyLoops<Isa::kAvx2, scalar_t, float>{
    16, &philox_list_avx2, &site_sums_avx2<scalar_t>, &site_backward_avx2<scalar_t>};
template <typename scalar_t>  // site penalty, AVX-512: any chunk (masked tails)
constexpr SitePenaltyLoops<scalar_t, float> kSitePenaltyLoops<Isa::kAvx512, scalar_t, float>{
    1, &philox_list_avx512, &site_sums_avx512<scalar_t>, &site_backward_avx512<scalar_t>};
#endif

}  // namespace cpu
}  // namespace dropreg
